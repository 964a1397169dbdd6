"""`topkattn eval RUN_DIR`: decode a train-toy checkpoint token by token with a retriever.

Thin: parses options, builds the selectors, draws the progress bar, prints the result; the work is
:func:`topkattn.decoding.evaluate_decoding`.
"""
import json
import math

import click
import numpy as np

from topkattn.cli.common import (
    FiniteFloat,
    agree_click_error,
    check_decode_options,
    command,
    device_option,
    fail,
    finite_float,
    given_options,
    load_run_or_fail,
    progress_bar,
    quiet_option,
    refuse_given,
)


def _int_or_auto(value, option):
    """An option that takes an integer >= 1 or 'auto' (None stays None)."""
    if value is None or value == "auto":
        return value
    try:
        v = int(value)
    except ValueError:
        v = 0
    if v < 1:
        raise click.UsageError(f"{option} must be an integer >= 1 or 'auto', got {value!r}")
    return v


def _search(value):
    """--clusters-to-search: 'auto', an integer >= 1 or a fraction in (0, 1]."""
    if value == "auto":
        return value
    msg = f"--clusters-to-search must be an integer >= 1 or a fraction in (0, 1], got {value!r}"
    try:
        v = finite_float(value, "--clusters-to-search")
    except click.UsageError:
        raise click.UsageError(msg) from None
    if v >= 1 and v == int(v) and "." not in str(value):
        return int(v)
    if not 0 < v <= 1:
        raise click.UsageError(msg)
    return v


def _mpi_launch(retriever, tail_bound):
    """``(ranks, rank)``: (1, 0) unless mpiexec started this process as one of several ranks
    (then sharded decoding: exact or lorann)."""
    from topkattn.distributed.comm import launched_world

    if launched_world() is None:
        return 1, 0
    if retriever == "simulated":
        raise click.UsageError("--retriever simulated runs in one process; under mpiexec use exact or lorann")
    from topkattn.distributed import install_excepthook, world

    try:
        comm = world()
    except ImportError as e:
        fail(str(e))
    install_excepthook(comm)  # an error on one rank ends the job, never leaves the others waiting
    return comm.Get_size(), comm.Get_rank()


@command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--retriever", type=click.Choice(["exact", "lorann", "simulated"]), default="exact",
              show_default=True,
              help="exact: exact top-k; lorann: a LoRANN index per sequence over the MLA latent cache; "
                   "simulated: exact top-k with each key dropped with probability 1 - R and refilled.")
@click.option("--recall", "recall", type=FiniteFloat(0.0, 1.0, min_open=True), default=None,
              help="Recall R of the simulated retriever (required with --retriever simulated).")
@click.option("--k", "k", default=None,
              help="Keys per query at decode, or 'auto' for dynamic k (needs --tail-bound; capped at "
                   "--max-k) [default: the checkpoint's k; dense for a dense-trained run with exact].")
@click.option("--tail-bound", type=FiniteFloat(0.0, 1.0, max_open=True), default=None,
              help="Dynamic k: per query the smallest k whose left-out softmax mass is at most this "
                   "(with an integer --k, that k is the cap).")
@click.option("--max-k", type=click.IntRange(min=1), default=None,
              help="Cap of --k auto [default: every key the query sees].")
@click.option("--n-sequences", type=click.IntRange(min=1), default=256, show_default=True,
              help="Held-out sequences (the run's own held-out set, from its first).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Sequences decoded together.")
@click.option("--prompt-len", type=click.IntRange(min=0), default=None,
              help="Tokens prefilled exactly before the retriever takes over "
                   "[default: the key-value pairs for mqar, half the sequence for text].")
@click.option("--clusters", default="auto", show_default=True,
              help="lorann: clusters per index, or 'auto' (ceil(sqrt(N)) at each build).")
@click.option("--clusters-to-search", "search", default="auto", show_default=True,
              help="lorann: clusters probed per query, an integer, a fraction of the clusters, or 'auto' "
                   "(the clusters holding about max(8192, 16 sqrt(N)) keys).")
@click.option("--rerank", type=click.IntRange(min=0), default=None,
              help="lorann: candidates re-ranked exactly inside the index (0: approximate scores) "
                   "[default: 2 k].")
@click.option("--rank", type=click.IntRange(min=1), default=32, show_default=True,
              help="lorann: rank of each cluster's regression.")
@click.option("--refit-factor", type=FiniteFloat(min=1.0, min_open=True), default=None,
              help="lorann: rebuild an index from scratch once it has grown by this factor [default: never; "
                   "it grows by adds, with background refits and cluster splits].")
@click.option("--no-refit", is_flag=True, help="lorann: never rebuild (only incremental adds).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the simulated drops and the indexes' k-means.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object on stdout instead of the table (the bar stays on stderr).")
@device_option
@quiet_option
def eval_cmd(run_dir, retriever, recall, k, tail_bound, max_k, n_sequences, batch_size, prompt_len,
             clusters, search, rerank, rank, refit_factor, no_refit, seed, as_json, device, quiet):
    """Decode a train-toy run's held-out set token by token with a retriever; print accuracy and recall.

    \b
    Example:  topkattn eval run/ --retriever simulated --recall 0.8
              topkattn eval run/ --retriever lorann --clusters-to-search 0.5 --rerank 16 --json
              topkattn eval run/ --retriever exact --k 16 --tail-bound 0.01
              topkattn eval run/ --retriever lorann --k auto --tail-bound 0.01 --max-k 32
              mpiexec -n 2 topkattn eval run/ --retriever lorann   (the cache sharded over 2 ranks)
              topkattn eval run/ --device gpu       (weights, caches and decode steps as CuPy arrays)

    A block top-k run (train-toy --attention block) decodes as trained: the cache keeps each key
    block's mean and every step attends its own block and the best others (--retriever exact, no
    --k; under mpiexec each rank keeps the means of its own blocks and the choice is merged).
    A hybrid run's --dense-layers stay dense unless --k is given (then every layer takes it).
    --json adds attention_stats: the keys each layer attended per decode step.
    """
    from topkattn.decoding.runner import evaluate_decoding, selector_factory
    from topkattn.training.tasks import IGNORE
    from topkattn.training.train import heldout_set, make_task

    if retriever == "simulated" and recall is None:
        raise click.UsageError("--retriever simulated needs --recall R")
    if retriever != "simulated" and recall is not None:
        raise click.UsageError(f"--recall applies only to --retriever simulated, not {retriever}")
    if retriever == "simulated" and tail_bound is not None:
        raise click.UsageError("--tail-bound (dynamic k) works with --retriever exact or lorann")
    index_options = given_options(click.get_current_context(), "clusters", "search", "rerank", "rank",
                                  "refit_factor", "no_refit")
    if retriever != "lorann":
        refuse_given(index_options, f"--retriever lorann, not {retriever}")
    if refit_factor is not None and no_refit:
        raise click.UsageError("--refit-factor rebuilds an index once it has grown by that factor, --no-refit never "
                               "rebuilds: give one of them")
    k = _int_or_auto(k, "--k")
    n_clusters = _int_or_auto(clusters, "--clusters")
    n_clusters = None if n_clusters == "auto" else n_clusters
    to_search = _search(search)
    if k == "auto" and tail_bound is None:
        raise click.UsageError("--k auto (dynamic k) needs --tail-bound EPS")
    if max_k is not None and k != "auto":
        raise click.UsageError("--max-k is the cap of --k auto; with an integer --k that k is the cap")
    ranks, mpi_rank = _mpi_launch(retriever, tail_bound)
    setup_error = None
    try:  # under MPI every rank loads its own copy of the run: an error on one rank must end them all
        cfg, model = load_run_or_fail(run_dir)
        if device == "gpu":  # the decode runner follows the parameters' array module
            from topkattn.backend import require_cupy

            model.to_device(require_cupy())
        check_decode_options(run_dir, cfg, retriever, [name for name, value in (
            ("--k", k), ("--tail-bound", tail_bound), ("--max-k", max_k)) if value is not None])
        task = make_task(cfg)
        inputs, targets = heldout_set(task, cfg)
        inputs, targets = inputs[:n_sequences], targets[:n_sequences]
        if k == "auto":
            k_eval = max_k or inputs.shape[1]  # the cap: every key a query can see by default
        elif k is not None:
            k_eval = k
        elif cfg.attention == "topk":
            k_eval = cfg.k
        elif cfg.attention == "block":
            k_eval = None  # the block layers' own selection
        elif retriever == "exact" and tail_bound is None:
            k_eval = None  # a dense-trained run, decoded as trained: dense
        else:
            with_bound = " with --tail-bound" if retriever == "exact" else ""
            raise click.UsageError(f"{run_dir} was trained with dense attention: give --k K (or --k auto) "
                                   f"for --retriever {retriever}{with_bound}")
        T = inputs.shape[1]
        if prompt_len is None:
            prompt_len = 2 * cfg.num_kv_pairs if cfg.task == "mqar" else T // 2
        elif prompt_len >= T:  # nothing would be decoded by the retriever, nothing scored
            raise click.UsageError(f"--prompt-len must be below the run's sequence length {T} (at least one "
                                   f"token decoded by the retriever), got {prompt_len}")
        scored = np.flatnonzero((np.asarray(targets) != IGNORE).any(axis=0))  # positions holding a target
        if not scored.size or scored[-1] < prompt_len:  # eval would score no token
            last = scored[-1] if scored.size else -1
            raise click.UsageError(f"--prompt-len {prompt_len} leaves no scored target after it (the run's "
                                   f"{cfg.task} sequences score none past position {last})")
        lorann = {}
        if retriever == "lorann":
            lorann = dict(n_clusters=n_clusters, clusters_to_search=to_search,
                          points_to_rerank="auto" if rerank is None else rerank, rank=rank,
                          refit_factor=None if no_refit else refit_factor)
        make = selector_factory(retriever, len(model.blocks), recall=recall, tail_bound=tail_bound, seed=seed,
                                **lorann)
        if ranks > 1 and cfg.tail is not None:
            raise click.UsageError(f"{run_dir} was trained with --tail {cfg.tail}: sharded decoding (mpiexec) has no "
                                   f"tail; decode it in one process")
    except click.ClickException as e:
        setup_error = e
    if ranks > 1:
        from topkattn.distributed import world

        agree_click_error(world(), setup_error)
    elif setup_error is not None:
        raise setup_error
    if ranks > 1:  # every rank decodes the same sequences; each stores and searches its share of the cache
        from topkattn.distributed import shard_decoding, sharded_selector_factory, world

        try:  # block top-k layers: positions dealt in blocks of 64 rounded up to a multiple of --block-size
            shard_decoding(model, world())
        except ValueError as e:  # layers sharded decoding does not run (variants): the same on every rank
            raise click.UsageError(f"{run_dir}: {e}") from None
        make = sharded_selector_factory(make, world())
        quiet = quiet or mpi_rank != 0
    # a hybrid run without --k keeps its dense layers dense (each layer its own k)
    own_k = k is None and tail_bound is None and (cfg.attention == "block" or bool(cfg.dense_layers))
    model.enable_attention_stats()
    with progress_bar(len(inputs), f"eval {retriever}", "seq", quiet) as bar:
        res = evaluate_decoding(model, inputs, targets, make_selectors=make, prompt_len=prompt_len,
                                topk=None if own_k else k_eval, batch_size=batch_size,
                                progress=lambda done: bar.update(done - bar.n))
    out = {"retriever": retriever, "k": "auto" if k == "auto" else k_eval, "max_k": k_eval if k == "auto" else None,
           "accuracy": res["accuracy"], "recall": res["recall"], "loss": res["loss"],
           "bits_per_token": res["bits_per_token"],
           "mean_k": res["mean_k"], "seconds": res["seconds"], "target_recall": recall,
           "recall_by_rank": res["recall_by_rank"],
           "tail_bound": tail_bound, "certified_fraction": res["certified_fraction"],
           "k_quantiles": res["k_quantiles"], "k_hist": res["k_hist"], "n_sequences": len(inputs),
           "n_scored": res["n_scored"], "prompt_len": prompt_len, "task": cfg.task,
           "train_attention": cfg.attention, "train_k": cfg.k if cfg.attention == "topk" else None,
           "train_forget_rate": cfg.forget_rate, "per_layer": res["per_layer"], "ranks": ranks,
           "train_block": [cfg.block_size, cfg.topk_blocks] if cfg.attention == "block" else None,
           "train_dense_layers": list(cfg.dense_layers), "train_tail": cfg.tail, "device": device,
           "attention_stats": model.attention_stats()}
    if cfg.task == "text":
        out["bits_per_char"] = res["bits_per_token"]  # byte-level tokens
    if k_eval is None:
        out["mean_k"] = None  # dense decode: every visible key
    if cfg.attention == "block":
        out["recall"] = out["recall_by_rank"] = None  # no token selector ran: see attention_stats
    if retriever == "lorann":
        out["index"] = {"clusters": clusters, "clusters_to_search": to_search,
                        "rerank": "auto" if rerank is None else rerank,
                        "rank": lorann["rank"], "refit_factor": None if no_refit else refit_factor}
    if mpi_rank != 0:  # the ranks agree; one of them speaks
        return
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
        return
    rows = [("run", run_dir), ("task", cfg.task), ("retriever", retriever),
            ("k", f"auto (max {k_eval})" if k == "auto" else (
                f"blocks of {cfg.block_size}, {cfg.topk_blocks} per query" if cfg.attention == "block" else
                ("dense" if k_eval is None else k_eval)))]
    if recall is not None:
        rows.append(("target recall", f"{recall:.3f}"))
    if tail_bound is not None:
        cf = res["certified_fraction"]
        rows += [("tail bound", tail_bound), ("k p10/p50/p90", "/".join(str(v) for v in res["k_quantiles"].values())),
                 ("certified rows", "-" if cf is None else f"{cf:.3f}")]
    acc = res["accuracy"]
    rows += [("accuracy", "nan" if math.isnan(acc) else f"{acc:.4f}"),
             ("bits per char" if cfg.task == "text" else "bits per token", f"{res['bits_per_token']:.4f}"),
             ("measured recall", "-" if out["recall"] is None else f"{out['recall']:.4f}"),
             ("mean k", "all keys" if k_eval is None and cfg.attention != "block" else
              f"{out['attention_stats']['all']['total']['keys_per_query_mean']:.2f}" if k_eval is None else
              f"{res['mean_k']:.2f}"), ("sequences", len(inputs)),
             ("scored tokens", res["n_scored"]),
             ("seconds", f"{res['seconds']:.1f}")]
    w = max(len(r[0]) for r in rows)
    for name, val in rows:
        click.echo(f"{name:<{w}}  {val}")
