"""Sample paragraphs (64-256 MiniLM tokens each) for the top-k vs dense embedding checks.

Written for this project; varied topics and lengths so that the cosine-vs-k curve in
``benchmarks/bench_pretrained_topk.py`` and the tests do not hinge on one style of text.
"""

SAMPLE_PARAGRAPHS = (
    "The old lighthouse on the northern cape was switched off in the spring of 1987, after a "
    "satellite navigation system made its beam redundant. For a few years the building stood "
    "empty, its lamp room cracked by winter storms and its iron stairs slowly rusting. Then a "
    "group of retired sailors from the village formed a small trust, raised money through "
    "summer concerts and bake sales, and repaired the roof, the windows and the keeper's "
    "cottage. Today the tower is a museum, and on clear nights the volunteers light a smaller "
    "lamp so that children can see how the signal once looked from the sea.",

    "To bake a simple sourdough loaf, mix four hundred grams of bread flour with three hundred "
    "grams of water and let the dough rest for half an hour. Add one hundred grams of active "
    "starter and ten grams of salt, then fold the dough every thirty minutes for two hours. "
    "Shape it into a tight ball, place it in a floured basket and leave it in the refrigerator "
    "overnight. The next morning, bake it in a covered pot at a high temperature for twenty "
    "minutes, remove the lid and bake until the crust is deep brown.",

    "Photosynthesis converts light energy into chemical energy stored in sugar. In the "
    "thylakoid membranes of the chloroplast, pigments absorb photons and pass their energy to "
    "reaction centres, where water molecules are split and oxygen is released. The electrons "
    "travel along a transport chain that pumps protons across the membrane, and the resulting "
    "gradient drives the synthesis of ATP. In the stroma, the Calvin cycle uses this ATP and "
    "the reducing power of NADPH to fix carbon dioxide into three-carbon sugars, which the "
    "plant later assembles into glucose, starch and cellulose.",

    "When the software team moved their service to a new database, the first week went badly. "
    "Queries that had taken a few milliseconds now took seconds, and the support inbox filled "
    "with complaints. After a long night of profiling, an engineer noticed that an index had "
    "not been copied during the migration. Once it was rebuilt, response times dropped back to "
    "normal. The team wrote a checklist for future migrations, added an automated comparison "
    "of schemas, and promised themselves never again to schedule such a change on a Friday "
    "afternoon.",

    "The river delta is one of the richest habitats on the continent. Every autumn, hundreds of "
    "thousands of migrating birds stop on its mud flats to feed on worms, snails and small "
    "crabs before continuing south. Fishermen in the surrounding villages have long depended on "
    "the same waters, and conflicts over the use of the wetlands are common. Recent projects "
    "have tried to balance these interests by creating protected zones, limiting the size of "
    "nets, and paying farmers to flood their fields in winter so that the birds have more "
    "places to rest.",

    "Learning a second language as an adult is slower than learning one as a child, but it is "
    "far from impossible. Adults bring advantages that children lack: they can read grammar "
    "explanations, use dictionaries and plan their own practice. The most successful learners "
    "combine this deliberate study with large amounts of listening and reading for pleasure. "
    "They accept making mistakes in conversation, keep a notebook of useful phrases, and "
    "return to the same material several times, noticing more details on each pass. Progress "
    "often feels invisible from week to week, yet becomes obvious over a year.",

    "The committee met on Tuesday to review the proposal for a new public library in the "
    "eastern district. Supporters argued that the nearest branch is more than an hour away by "
    "bus and that the district has the highest number of school children in the city. Critics "
    "worried about the cost of maintenance and suggested a mobile library instead. After three "
    "hours of debate, the committee voted to fund a detailed study of both options, with a "
    "final decision expected before the end of the financial year.",

    "A good hiking boot must balance support, weight and breathability. Heavy leather boots "
    "protect the ankle on rocky ground and last for many years, but they take weeks to break "
    "in and can feel hot in summer. Lighter synthetic boots are comfortable from the first day "
    "and dry quickly after a river crossing, although their soles wear out sooner. Whatever "
    "the material, the fit matters most: try boots in the afternoon, when feet are slightly "
    "swollen, and wear the socks you plan to use on the trail.",

    "Classical music of the eighteenth century was shaped by the patrons who paid for it. "
    "Composers often worked for a court or a church, writing music for dinners, services and "
    "celebrations on short notice. Joseph Haydn spent almost thirty years in the service of a "
    "noble family, producing symphonies, operas and string quartets for their palace. The "
    "isolation forced him, as he later said, to become original. Later composers relied more "
    "on public concerts and the sale of printed scores, which gave them greater freedom but "
    "less security.",

    "Volcanic eruptions can cool the climate for several years. Large explosive eruptions "
    "inject sulphur dioxide into the stratosphere, where it forms tiny droplets of sulphuric "
    "acid that reflect sunlight back into space. After the eruption of Mount Pinatubo in 1991, "
    "average global temperatures fell by about half a degree Celsius for roughly two years. "
    "Historical records describe even stronger effects: the eruption of Tambora in 1815 was "
    "followed by the so-called year without a summer, when crops failed across Europe and "
    "North America.",

    "The startup began in a small garage with two friends and a single prototype of a solar "
    "powered water pump. Farmers in the region were paying large sums for diesel to irrigate "
    "their fields, and the friends believed that sunlight could do the same job for free once "
    "the pump was installed. The first versions broke often, and the founders spent months "
    "driving between villages to repair them. Their persistence paid off: within five years "
    "the company had installed thousands of pumps and employed more than two hundred people, "
    "many of them trained technicians from the same villages.",

    "Sleep is not a passive state. During the night the brain cycles through several stages, "
    "each with its own pattern of electrical activity. In deep sleep, slow waves sweep across "
    "the cortex and appear to help consolidate memories of facts and events. During rapid eye "
    "movement sleep, the brain becomes almost as active as when awake, and most vivid dreams "
    "occur. Regularly cutting sleep short impairs attention, mood and the immune system, and "
    "over the long term it is linked to a higher risk of heart disease and diabetes.",
)


def eval_texts():
    """The evaluation set, 18 texts of about 95-250 tokens plus 12 shorter ones (about 45-80):
    the 12 paragraphs, 6 two-paragraph texts, and the first three sentences of each paragraph."""
    P = SAMPLE_PARAGRAPHS
    pairs = [P[i] + " " + P[i + 1] for i in range(0, len(P), 2)]
    heads = [". ".join(p.split(". ")[:3]) + "." for p in P]
    return list(P) + pairs + heads
