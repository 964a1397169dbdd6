"""`topkattn generate RUN_DIR`: sample tokens from a train-toy run with the decode path.

Thin: parses the prompt and options, builds the retriever's selectors, draws the progress bar,
prints the tokens; the work is :meth:`topkattn.model.Transformer.generate`.
"""
import json
import os
import re
import time
import unicodedata

import click

from topkattn.cli.common import (
    FiniteFloat,
    check_decode_options,
    command,
    given_options,
    load_run_or_fail,
    progress_bar,
    quiet_option,
    refuse_given,
)


def prompt_tokens(task, vocab_size, prompt, prompt_ids):
    """The prompt as token ids: a text run's characters as UTF-8 bytes (its vocabulary is the
    256 byte values; bytes of the argument that are not UTF-8 are kept as they are), or
    ``prompt_ids`` ("3 17 5" or "3,17,5") for any run; usage errors naming the option."""
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt TEXT (text runs) or --prompt-ids IDS")
    if prompt is not None:
        if task != "text":
            raise click.UsageError(f"--prompt TEXT needs a text run; this run's task is {task!r} (no text "
                                   f"vocabulary): give token ids with --prompt-ids")
        try:  # the argument's bytes as given: os.fsencode undoes how Python decoded argv (surrogateescape)
            raw = os.fsencode(prompt)
        except UnicodeEncodeError:  # a character no byte stands for (e.g. a lone surrogate from Python)
            raw = prompt.encode("utf-8", errors="replace")
        ids = list(raw)
        if not ids:
            raise click.UsageError("--prompt must not be empty")
        return ids
    parts = [p for p in re.split(r"[\s,]+", prompt_ids.strip()) if p]
    if not parts or not all(re.fullmatch(r"[0-9]+", p) for p in parts):
        raise click.UsageError(f"--prompt-ids must be token ids separated by spaces or commas, got {prompt_ids!r}")
    ids = [int(p) for p in parts]
    bad = [i for i in ids if i >= vocab_size]
    if bad:
        raise click.UsageError(f"--prompt-ids must lie in [0, {vocab_size}) (the run's vocabulary), got {bad[0]}")
    return ids


def check_generation_memory(model, prompt_len, max_new_tokens):
    """A usage error naming --max-new-tokens when the tokens and every layer's decode cache for
    ``prompt_len + max_new_tokens`` positions (a lower bound of what generating takes) exceed
    this machine's memory."""
    from topkattn.training.train import format_bytes, machine_memory

    positions = prompt_len + max_new_tokens
    per_position = 8 + model.kv_bytes_per_token()  # an int64 token and its cached keys and values
    need, have = positions * per_position, machine_memory()
    if have is not None and need > have:
        raise click.UsageError(f"--max-new-tokens {max_new_tokens}: generating needs at least {format_bytes(need)} "
                               f"of memory ({per_position} bytes per position for the tokens and the decode "
                               f"cache), more than this machine's {format_bytes(have)}")


def decode_text(ids):
    """Byte tokens as text: invalid UTF-8 and control characters other than tab and newline shown
    as U+FFFD (a sampled escape sequence must not drive the terminal)."""
    text = bytes(ids).decode("utf-8", errors="replace")
    return "".join("\ufffd" if unicodedata.category(ch) == "Cc" and ch not in "\t\n" else ch for ch in text)


@command("generate")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--prompt", default=None, help="Prompt text (text runs: each byte of its UTF-8 is a token).")
@click.option("--prompt-ids", default=None, help="Prompt token ids, e.g. '3 17 5' (any run; MQAR runs need them).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens to generate.")
@click.option("--temperature", type=FiniteFloat(min=0.0), default=0.0, show_default=True,
              help="0: greedy (arg-max); above 0: sample from softmax(logits / T).")
@click.option("--top-p", type=FiniteFloat(0.0, 1.0, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling: only the most probable tokens whose mass reaches P (with --temperature > 0).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the sampling and of the LoRANN indexes.")
@click.option("--retriever", type=click.Choice(["exact", "lorann"]), default="exact", show_default=True,
              help="Keys of each generated token: exact top-k, or a LoRANN index over the MLA latent cache "
                   "(built over the prompt, grown as tokens are generated).")
@click.option("--k", "k", type=click.IntRange(min=1), default=None,
              help="Keys per query at decode [default: the run's k; a dense-trained run decodes dense "
                   "with exact and needs --k with lorann].")
@click.option("--clusters-to-search", "search", type=FiniteFloat(0.0, 1.0, min_open=True), default=0.25,
              show_default=True, help="lorann: fraction of the clusters probed per query.")
@click.option("--rerank", type=click.IntRange(min=0), default=0, show_default=True,
              help="lorann: candidates re-ranked exactly inside the index.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object on stdout (ids, text for text runs, recall, timing).")
@quiet_option
def generate(run_dir, prompt, prompt_ids, max_new_tokens, temperature, top_p, seed, retriever, k, search, rerank,
             as_json, quiet):
    """Generate tokens from a train-toy run, token by token through the latent-cache decode path.

    \b
    Example:  topkattn generate run/ --prompt "def main(" --max-new-tokens 80
              topkattn generate run/ --prompt "import " --temperature 0.8 --top-p 0.9 --seed 1
              topkattn generate mqar_run/ --prompt-ids "5 40 9 33 5" --max-new-tokens 1 --json
              topkattn generate run/ --prompt "class " --retriever lorann --k 8

    Text runs (--task text) read the prompt as UTF-8 bytes and print text; MQAR runs take and
    print token ids.  --temperature 0 (the default) is greedy and needs no seed.
    """
    from topkattn.decoding.runner import selector_factory

    if top_p != 1.0 and temperature == 0:
        raise click.UsageError("--top-p applies only with --temperature > 0 (0 is greedy)")
    index_options = given_options(click.get_current_context(), "search", "rerank")
    if retriever != "lorann":
        refuse_given(index_options, f"--retriever lorann, not {retriever}")
    cfg, model = load_run_or_fail(run_dir)
    ids = prompt_tokens(cfg.task, model.cfg.vocab_size, prompt, prompt_ids)
    check_decode_options(run_dir, cfg, retriever, ["--k"] if k is not None else [])
    if k is None and cfg.attention == "dense" and retriever == "lorann":
        raise click.UsageError(f"{run_dir} was trained with dense attention: give --k K for --retriever lorann")
    check_generation_memory(model, len(ids), max_new_tokens)
    lorann = dict(clusters_to_search=search, points_to_rerank=rerank) if retriever == "lorann" else {}
    selectors = selector_factory(retriever, len(model.blocks), seed=seed, **lorann)(0)
    t0 = time.perf_counter()
    with progress_bar(max_new_tokens, f"generate {retriever}", "tok", quiet) as bar:
        out = model.generate(ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                             selectors=selectors, topk=k, progress=lambda n: bar.update(n - bar.n))
    seconds = time.perf_counter() - t0
    new = [int(t) for t in out[len(ids):]]
    hits = sum(s.stats.hits for s in selectors)
    wanted = sum(s.stats.wanted for s in selectors)
    if as_json:
        doc = {"run": run_dir, "task": cfg.task, "retriever": retriever,
               "k": k if k is not None else (cfg.k if cfg.attention == "topk" else None),
               "temperature": temperature, "top_p": top_p, "seed": seed, "prompt_ids": ids, "generated_ids": new,
               "recall": hits / wanted if wanted else 1.0, "seconds": seconds,
               "tokens_per_s": len(new) / seconds if seconds > 0 else None}
        if cfg.task == "text":
            doc["prompt"], doc["text"] = decode_text(ids), decode_text(new)
        click.echo(json.dumps(doc, sort_keys=True))
    elif cfg.task == "text":
        click.echo(decode_text(ids + new))
    else:
        click.echo(" ".join(str(t) for t in ids) + " | " + " ".join(str(t) for t in new))
