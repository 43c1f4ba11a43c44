"""The `raymeta` command: run, sweep, validate, results."""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import time
from pathlib import Path

import click
import yaml

from raymeta.errors import ConfigError, RaymetaError, StorageError


def _overrides(pairs: tuple[str, ...]) -> dict:
    from raymeta.config import set_dotted

    data: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=5), got '{pair}'")
        key, value = pair.split("=", 1)
        set_dotted(data, key.strip(), yaml.safe_load(value))
    return data


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="raymeta")
def cli() -> None:
    """Meta-learning for noisy labels, run as experiments with Ray."""


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override a config value, e.g. --set noise.rate=0.4 (repeatable)")
@click.option("--store", default="results", show_default=True, help="results store (folder or URI)")
@click.option("--sweep", "sweep_name", default="runs", show_default=True,
              help="results partition the run is written to")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="checkpoint folder [default: runs/<trial id>]")
@click.option("--resume", is_flag=True, help="continue from the checkpoint in --out")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="data-parallel workers (Ray Train); batch_size is per worker")
@click.option("--gpus-per-worker", type=click.IntRange(min=0), default=0, show_default=True,
              help="with --workers: GPUs of each worker (0: train on CPUs, gloo)")
@click.option("--max-failures", type=click.IntRange(min=0), default=1, show_default=True,
              help="with --workers: restarts from the last checkpoint after a worker dies")
@click.option("--address", default=None, help="with --workers: Ray cluster address "
              "(default: start a local Ray)")
@click.option("--seeds", default=None, metavar="S,S,...",
              help="train once per seed, all packed into one model in this process (every "
                   "method but mlnt); one results row per seed")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads of this process [default: the CPUs it may use: "
                   "OMP_NUM_THREADS, else its affinity mask]")
@click.option("--track", "trackers", multiple=True, type=click.Choice(["mlflow", "wandb"]),
              help="also log the run to MLflow (at MLFLOW_TRACKING_URI, default "
                   "sqlite:///mlflow.db) or W&B (project WANDB_PROJECT, default the --sweep "
                   "name; WANDB_MODE=offline writes it locally); repeatable")
def run(config: str, sets: tuple[str, ...], store: str, sweep_name: str, out: str | None,
        resume: bool, workers: int, gpus_per_worker: int, max_failures: int,
        address: str | None, seeds: str | None, threads: int | None,
        trackers: tuple[str, ...]) -> None:
    """Train one experiment: in this process (no Ray), or on --workers Ray Train workers."""
    from raymeta.config import ResourcesConfig, check_sweep_name, parse_experiment, set_dotted
    from raymeta.orchestrate.grid import absolutize, read_yaml

    check_sweep_name(sweep_name, "--sweep")
    data = read_yaml(config) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{config}: expected a mapping of config sections (dataset, noise, ...)")
    for key, value in _flatten_sets(_overrides(sets)).items():
        set_dotted(data, key, value)
    data = absolutize(data, Path(config).resolve().parent)
    cfg = parse_experiment(data, where=config)
    trial_id = cfg.trial_id()
    tracking = _tracking(trackers, sweep_name, store)
    # torch and Ray load only once the config is known to be good: a refusal is instant
    if workers == 1:  # Ray sets the threads of its workers
        from raymeta.threads import use_threads

        count, why = use_threads(threads)
        click.echo(f"{count} CPU thread(s) ({why}; --threads N to choose)")
    from raymeta.orchestrate.preflight import preflight
    from raymeta.orchestrate.trial import run_trial

    if seeds is not None:
        if workers > 1:
            raise ConfigError("--seeds packs seeds into this one process; it does not combine "
                              "with --workers (use one or the other)")
        with _tracked(tracking):
            _run_packed(cfg, _seed_list(seeds), store, sweep_name, out, resume, tracking)
        return
    if workers > 1:
        resources = ResourcesConfig(workers_per_trial=workers, cpus_per_trial=workers,
                                    gpus_per_trial=gpus_per_worker * workers,
                                    max_failures=max_failures)
        preflight([cfg], store, resources, address, trial_id)
        with _tracked(tracking):
            _run_distributed(cfg, trial_id, store, sweep_name, resources, address)
            if tracking is not None:  # Ray Train's workers report to it: logged from the rows
                tracking.replay(trial_id)
        return
    folder = Path(out or Path("runs") / trial_id)
    resume_from = _resume_from(folder, resume, cfg.digest())
    preflight([cfg], store, None, None, trial_id)

    def progress(metrics: dict, trainer) -> None:
        click.echo(f"epoch {metrics['epoch'] + 1:3d}/{cfg.train.epochs}  "
                   f"train_loss {metrics['train_loss']:.4f}  test_acc {metrics['test_acc']:.4f}  "
                   f"meta_acc {metrics['meta_acc']:.4f}  {metrics['ms_per_step']:.1f} ms/step")
        if tracking is not None:
            tracking.epoch(trial_id, cfg.model_dump(mode="json"), metrics)

    with _resumable(folder), _tracked(tracking):
        row = run_trial(cfg, store=store, sweep=sweep_name, trial_id=trial_id,
                        on_epoch_end=progress, checkpoint_dir=folder, resume_from=resume_from)
    click.echo(f"{trial_id}: final test acc {row['final_test_acc']:.4f}, peak "
               f"{row['best_test_acc']:.4f}; rows written to {_shown(store)} (sweep '{sweep_name}')")


def _tracking(trackers: tuple[str, ...], sweep_name: str, store: str):
    """The trackers `raymeta run --track` logs to (checked before anything trains), or None."""
    if not trackers:
        return None
    import os

    from raymeta.config import TrackingConfig
    from raymeta.results.store import resolve_store
    from raymeta.tracking import Tracking, check_tracking

    wandb_mode = os.environ.get("WANDB_MODE", "online")
    settings = TrackingConfig.model_validate({
        "mlflow": {"uri": os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")}
        if "mlflow" in trackers else None,
        "wandb": {"mode": "offline" if wandb_mode in ("offline", "dryrun") else "online",
                  "project": os.environ.get("WANDB_PROJECT")} if "wandb" in trackers else None})
    check_tracking(settings)
    return Tracking(settings, sweep_name, resolve_store(store))


@contextlib.contextmanager
def _tracked(tracking):
    """The tracked runs end with the run: as its rows say, or failed."""
    try:
        yield
    finally:
        if tracking is not None:
            tracking.close()


def _resume_from(folder: Path, resume: bool, digest: str) -> Path | None:
    """The checkpoint folder to continue from with --resume (None: start at epoch 0); a
    checkpoint of another config is refused before anything runs."""
    if not resume:
        return None
    if not (folder / "checkpoint.pt").exists():
        click.echo(f"no checkpoint in {folder}; starting from epoch 0", err=True)
        return None
    from raymeta.train.checkpoint import check_checkpoint

    check_checkpoint(folder, digest)
    return folder


@contextlib.contextmanager
def _resumable(folder: Path):
    """Ctrl-C (or SIGTERM) during a run: say how to continue from its last epoch, exit 130."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    saved = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt:
        again = " ".join(shlex.quote(a) for a in ["raymeta", *sys.argv[1:]])
        if "--resume" not in sys.argv:
            again += " --resume"
        done = "its last finished epoch is" if (folder / "checkpoint.pt").exists() else "no epoch was"
        click.echo(f"\ninterrupted: no results row was written; {done} saved in {folder}; "
                   f"continue with: {again}", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, saved)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds expects seeds separated by commas, like 0,1,2,3; got '{text}'")
    return seeds


def _run_packed(cfg, seeds: list[int], store: str, sweep_name: str,
                out: str | None, resume: bool, tracking=None) -> None:
    """The seeds of one experiment, packed (raymeta.train.packed); a row per seed."""
    from raymeta.orchestrate.preflight import preflight
    from raymeta.orchestrate.trial import run_packed_trial
    from raymeta.train.packed import pack_digest, packed_configs

    cfgs = packed_configs(cfg, seeds)
    trial_ids = [c.trial_id() for c in cfgs]
    folder = Path(out or Path("runs") / f"{trial_ids[0]}-pack{len(cfgs)}")
    resume_from = _resume_from(folder, resume, pack_digest(cfgs))
    preflight(cfgs, store, None, None, trial_ids[0])

    def progress(per_seed: list[dict], trainer) -> None:
        accs = " ".join(f"{m['test_acc']:.4f}" for m in per_seed)
        click.echo(f"epoch {per_seed[0]['epoch'] + 1:3d}/{cfg.train.epochs}  test_acc per seed "
                   f"{accs}  {per_seed[0]['ms_per_step']:.1f} ms/step ({len(seeds)} seeds)")
        if tracking is not None:
            for trial_id, seed_cfg, metrics in zip(trial_ids, cfgs, per_seed):
                tracking.epoch(trial_id, seed_cfg.model_dump(mode="json"), metrics)

    with _resumable(folder):
        rows = run_packed_trial(cfgs, trial_ids, store=store, sweep=sweep_name,
                                on_epoch_end=progress, checkpoint_dir=folder,
                                resume_from=resume_from)
    for trial_id, row in zip(trial_ids, rows):
        click.echo(f"{trial_id}: final test acc {row['final_test_acc']:.4f}, peak "
                   f"{row['best_test_acc']:.4f}")
    click.echo(f"rows written to {_shown(store)} (sweep '{sweep_name}')")


def _run_distributed(cfg, trial_id: str, store: str, sweep_name: str, resources,
                     address: str | None) -> None:
    """A data-parallel run; Ray Train keeps its checkpoints, so rerunning it continues."""
    from raymeta.orchestrate.distributed import fit_distributed, train_storage
    from raymeta.orchestrate.runtime import start_ray
    from raymeta.results.store import resolve_store

    store = resolve_store(store)
    workers = resources.workers_per_trial
    start_ray(address)  # what a local Ray can hold was checked by preflight
    click.echo(f"{trial_id}: {workers} workers, checkpoints in "
               f"{_shown(train_storage(store, sweep_name))}/{trial_id}")
    outcome = fit_distributed(cfg, resources, store=store, sweep=sweep_name, trial_id=trial_id)
    click.echo(f"{trial_id}: final test acc {outcome['final_test_acc']:.4f} on "
               f"{outcome['world_size']} workers; rows written to {_shown(store)} "
               f"(sweep '{sweep_name}')")


def _shown(store: str) -> str:
    """The store as printed: without the credentials a URI may carry."""
    from raymeta.results.store import display_store

    return display_store(store)


def _flatten_sets(data: dict) -> dict:
    from raymeta.config import flatten

    return flatten(data)


@cli.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray)")
@click.option("--store", default=None, help="override the sweep file's results store")
@click.option("--resume", is_flag=True, help="continue an interrupted sweep")
@click.option("--rerun", is_flag=True,
              help="train trials again even if their completed rows are in the store")
@click.option("--dry-run", is_flag=True, help="validate and list the trials, run nothing")
def sweep(sweep_file: str, address: str | None, store: str | None, resume: bool, rerun: bool,
          dry_run: bool) -> None:
    """Run every cell of a sweep file as a Ray Tune trial, then print the summary."""
    from raymeta.orchestrate.grid import expand, load_sweep

    spec = load_sweep(sweep_file)
    if store:
        spec = spec.model_copy(update={"store": store})
    cells = expand(spec, base_dir=Path.cwd())
    search_cells = None
    if spec.search is not None:
        from raymeta.orchestrate.search import plan

        search_cells = plan(spec, cells)
        search = spec.search
        then = (f"then the chosen configuration on seeds {search.confirm_seeds}"
                if search.confirm_seeds else "the chosen configuration's runs are the results")
        click.echo(f"sweep '{spec.name}': {search.algorithm} search of {search.num_samples} "
                   f"samples in each of {len(search_cells)} cells (chosen on {search.metric}, "
                   f"{search.at} epoch; each sample trains {len(cells) // len(search_cells)} "
                   f"seed(s)); {then} -> {_shown(spec.store)}")
        if search.random_only:
            click.echo(search.random_only)
        if dry_run:
            for key, dist in search.space.items():
                click.echo(f"  search {key}: {dist}")
            for scell in search_cells:
                click.echo(f"  {scell.cell_id}  {scell.label}")
            return
    else:
        k = spec.resources.seeds_per_trial
        packing = ""
        if k > 1:
            from raymeta.orchestrate.grid import pack_cells

            packing = f", packed into {len(pack_cells(cells, k))} processes of up to {k} seeds"
        click.echo(f"sweep '{spec.name}': {len(cells)} trials{packing} -> {_shown(spec.store)}")
        if dry_run:
            for cell in cells:
                click.echo(f"  {cell.trial_id}  {cell.overrides}")
            return
    import polars as pl

    from raymeta.orchestrate.owner import check_owner
    from raymeta.orchestrate.preflight import preflight
    from raymeta.orchestrate.sweep import run_sweep
    from raymeta.results import query
    from raymeta.results.store import resolve_store

    check_owner(spec, sweep_file)  # before Ray starts: another driver may hold this sweep
    if spec.tracking.enabled:
        from raymeta.tracking import check_tracking

        check_tracking(spec.tracking)
    preflight([c.config for c in cells], spec.store, spec.resources, address, f"sweep '{spec.name}'")
    started = time.monotonic()
    storage_error, unwritten, confirm, unsearched = None, set(), None, []
    try:
        outcome = run_sweep(spec, cells, address=address, resume=resume, rerun=rerun,
                            source=sweep_file, search_cells=search_cells)
        interrupted = outcome.interrupted
        storage_error, unwritten = outcome.storage_error, {u[1] for u in outcome.unwritten}
        if outcome.cells is not None:  # a search: its results are the confirmation runs
            cells = confirm = outcome.cells
        unsearched = outcome.unsearched
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once
        interrupted = True
    again = f"raymeta sweep {sweep_file} --resume{'' if store is None else ' --store ' + _shown(store)}"
    if spec.search is not None and not confirm:
        if interrupted:
            click.echo(f"interrupted during the search; finished samples keep their rows; "
                       f"continue with: {again}", err=True)
            sys.exit(130)
        click.echo(f"error: no sample of the search finished; see `raymeta results failed "
                   f"--sweep {spec.name}.search`", err=True)
        sys.exit(1)
    seconds = time.monotonic() - started
    # what the store holds for this sweep's cells is the truth, not what this run saw
    try:
        trials = query.unique_runs(query.load(resolve_store(spec.store), "trials", spec.name),
                                   quiet=True)
    except RaymetaError:
        trials = None
    status = dict(zip(trials["config_digest"], trials["status"])) if trials is not None else {}
    counts = {s: 0 for s in ("completed", "collapsed", "failed", "stopped")}
    for cell in cells:
        if (found := status.get(cell.config.digest())) in counts:
            counts[found] += 1
        elif cell.trial_id in unwritten:  # failed, its row refused by the store (listed above)
            counts["failed"] += 1
    ran = sum(counts.values())
    told = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in ("completed", "failed"))
    if storage_error:
        click.echo(f"error: the sweep stopped after {seconds:.0f}s: the results store "
                   f"{_shown(resolve_store(spec.store))} refuses writes ({storage_error}); "
                   f"{ran} of {len(cells)} trials ran ({told}), {len(cells) - ran} not started; "
                   f"free space (or fix the store's permissions or quota), then continue with: "
                   f"{again}", err=True)
    elif interrupted or ran < len(cells):
        click.echo(f"interrupted after {seconds:.0f}s: {counts['completed']} of {len(cells)} "
                   f"trials completed ({told}); continue with: {again}", err=True)
    else:
        click.echo(f"sweep '{spec.name}' finished in {seconds:.0f}s ({told})")
    if trials is not None:
        trials = trials.filter(pl.col("config_digest").is_in([c.config.digest() for c in cells]))
    if trials is not None and (trials["status"] == "completed").any():
        if ran < len(cells):
            click.echo(f"partial results: {ran} of {len(cells)} trials")
        click.echo(query.render(query.summary(trials)))
        _footnotes(trials, "text")
    if storage_error:
        sys.exit(1)
    if interrupted or ran < len(cells):
        sys.exit(130)
    if counts["failed"] or unsearched:
        sys.exit(1)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--address", default=None,
              help="the Ray cluster the sweep will run on (its resources are not checked here)")
def validate(paths: tuple[str, ...], address: str | None) -> None:
    """Check sweep files or experiment configs as `raymeta sweep` and `run` do before they
    start (config, data, store, resources); report every problem."""
    from raymeta.config import parse_experiment, parse_sweep
    from raymeta.orchestrate.grid import absolutize, expand, read_yaml

    problems = 0
    for path in paths:
        try:
            data = read_yaml(path)
            if data is None:
                raise ConfigError(f"{path} is empty; a sweep file needs name, base and grid, an "
                                  f"experiment config at least one section (dataset, method, ...)")
            if isinstance(data, dict) and ("grid" in data or "base" in data):
                spec = parse_sweep(data, where=path)
                cells = expand(spec, base_dir=Path.cwd())
                what = f"{len(cells)} trials"
                if spec.search is not None:
                    from raymeta.orchestrate.search import plan

                    what = (f"a search of {spec.search.num_samples} samples in each of "
                            f"{len(plan(spec, cells))} cells")
                if spec.tracking.enabled:
                    from raymeta.tracking import check_tracking

                    check_tracking(spec.tracking)
                _preflight([c.config for c in cells], spec.store, spec.resources, address,
                           f"sweep '{spec.name}'")
                click.echo(f"{path}: ok, sweep with {what}")
                if spec.search is not None and spec.search.random_only:
                    click.echo(f"{path}: {spec.search.random_only}")
            else:
                if not isinstance(data, dict):
                    raise ConfigError(f"{path}: expected a mapping of config sections (dataset, "
                                      f"noise, ...), got {type(data).__name__}")
                cfg = parse_experiment(absolutize(data, Path(path).resolve().parent), where=path)
                _preflight([cfg], "results", None, None, path)
                click.echo(f"{path}: ok, experiment config")
        except RaymetaError as err:
            problems += 1
            click.echo(f"{path}: {err}", err=True)
    if problems:
        sys.exit(2)


def _preflight(cfgs, store, resources, address, what) -> None:
    from raymeta.orchestrate.preflight import preflight

    preflight(cfgs, store, resources, address, what, create_store=False)


@cli.group()
def results() -> None:
    """Query the results store."""


_store_option = click.option("--store", default="results", show_default=True,
                             help="results store (folder or URI)")
_format_option = click.option("--format", "fmt", type=click.Choice(["text", "markdown", "csv", "latex"]),
                              default="text", show_default=True)
_sweep_option = click.option("--sweep", "sweep_name", default=None,
                             help="sweep name (default: all sweeps)")


@results.command()
@_sweep_option
@_store_option
@click.option("--by", default="method", show_default=True,
              help="row keys, comma-separated results columns")
@click.option("--columns", default="noise.type,noise.rate", show_default=True,
              help="column keys, comma-separated")
@click.option("--metric", default="final", show_default=True,
              help="final | peak | best_meta | any numeric results column")
@_format_option
def summary(sweep_name: str | None, store: str, by: str, columns: str, metric: str,
            fmt: str) -> None:
    """Mean ± std over seeds (n) of a test accuracy, methods x noise settings, in percent."""
    from raymeta.results import query

    trials = query.load(store, "trials", sweep_name)
    if fmt == "csv":  # numbers, one row per cell, for spreadsheets and plotting scripts
        cells = query.summary_cells(trials, by=_keys(by), columns=_keys(columns), metric=metric)
        click.echo(query.render(cells.select(*_keys(by), "setting", "metric", "mean", "std", "n",
                                             "failed", "collapsed", "best"), "csv"), nl=False)
    else:
        table = query.summary(trials, by=_keys(by), columns=_keys(columns), metric=metric)
        click.echo(query.render(table, fmt))
    _footnotes(trials, fmt)


def _footnotes(trials, fmt: str) -> None:
    """Under a text table: what it leaves out; other formats keep them off stdout."""
    from raymeta.results import query

    for note in query.footnotes(trials):
        click.echo(note, err=fmt != "text")


@results.command()
@click.argument("key")
@_sweep_option
@_store_option
@click.option("--metric", default="final", show_default=True,
              help="final | peak | best_meta | any numeric results column")
@_format_option
def ablation(key: str, sweep_name: str | None, store: str, metric: str, fmt: str) -> None:
    """The metric as a function of a config KEY (e.g. meta_set.per_class, famus.k), per method."""
    from raymeta.results import query

    trials = query.load(store, "trials", sweep_name)
    click.echo(query.render(query.ablation(trials, key, metric=metric), fmt))
    _footnotes(trials, fmt)


@results.command()
@_sweep_option
@_store_option
@_format_option
def speed(sweep_name: str | None, store: str, fmt: str) -> None:
    """ms per step, meta-step share, peak memory, FaMUS speed-up over the full method."""
    from raymeta.results import query

    table = query.speed(query.load(store, "trials", sweep_name))
    click.echo(query.render(table, fmt))


@results.command()
@_sweep_option
@_store_option
@_format_option
def costs(sweep_name: str | None, store: str, fmt: str) -> None:
    """Per sweep: trials by status, devices, when it ran, busy hours and trial hours."""
    from raymeta.results import query

    click.echo(query.render(query.costs(query.load(store, "trials", sweep_name)), fmt))


@results.command()
@_sweep_option
@_store_option
@click.option("--trial", "trial_ids", multiple=True, help="trial id (repeatable; default: all)")
@click.option("--metric", "metrics", multiple=True, default=("test_acc",), show_default=True,
              help="curve column (repeatable)")
@click.option("--by", default=None, help="average over trials grouped by these results columns")
@_format_option
def curves(sweep_name: str | None, store: str, trial_ids: tuple[str, ...], metrics: tuple[str, ...],
           by: str | None, fmt: str) -> None:
    """Per-epoch curves of chosen trials, or their mean and std grouped --by (e.g. method)."""
    from raymeta.results import query

    table = query.curves(store, sweep=sweep_name, trial_ids=trial_ids or None, metrics=metrics,
                         by=_keys(by) if by else None)
    click.echo(query.render(table, fmt))


@results.command("search")
@click.option("--sweep", "sweep_name", required=True, help="the sweep that searched")
@_store_option
@_format_option
def search_results(sweep_name: str, store: str, fmt: str) -> None:
    """Per grid cell: the configuration the search chose (on the meta set), its score, the
    samples tried, and the test accuracy of its confirmation runs (mean ± std over seeds)."""
    from raymeta.results import query
    from raymeta.results.search import report

    click.echo(query.render(report(store, sweep_name), fmt))


@results.command()
@click.argument("kind", type=click.Choice(["noise", "ablation", "curves", "search"]))
@click.argument("key", required=False)
@_sweep_option
@_store_option
@click.option("--metric", default="final", show_default=True,
              help="noise/ablation: final | peak | best_meta | a results column; "
                   "curves: a curve column (e.g. test_acc, meta_acc)")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="PNG file [default: plots/<sweep>-<kind>.png]")
def plot(kind: str, key: str | None, sweep_name: str | None, store: str, metric: str,
         out: str | None) -> None:
    """Write a PNG: accuracy vs noise rate (noise), vs a config KEY (ablation KEY), or
    per-epoch curves (curves); mean ± std over seeds, one line per method. `search`: a
    search's meta-set score against each searched key, and all keys at once (parallel
    coordinates), one colour per grid cell."""
    from raymeta.results import plots, query

    named = "" if metric == "final" else f"-{metric}"  # each metric its own file
    out = out or f"plots/{sweep_name or 'all'}-{kind}{'-' + key if key else ''}{named}.png"
    if kind == "search":
        if not sweep_name:
            raise click.UsageError("plot search needs --sweep NAME (the sweep that searched)")
        from raymeta.results.search import sample_scores

        click.echo(f"wrote {plots.search(sample_scores(store, sweep_name), out)}")
        return
    if kind == "curves":
        metric = "test_acc" if metric == "final" else metric
        table = query.curves(store, sweep=sweep_name, metrics=[metric],
                             by=["method", "noise.type", "noise.rate"])
        path = plots.accuracy_curves(table, out, metric)
    else:
        trials = query.load(store, "trials", sweep_name)
        if kind == "noise":
            path = plots.against_noise_rate(trials, out, metric)
        else:
            if not key:
                raise click.UsageError("plot ablation needs a config KEY, e.g. meta_set.per_class")
            path = plots.metric_against(trials, key, out, metric,
                                        panels=("noise.type", "noise.rate"))
    click.echo(f"wrote {path}")


@results.command()
@_sweep_option
@_store_option
def failed(sweep_name: str | None, store: str) -> None:
    """List the trials that did not complete (failed, collapsed, stopped) with their reasons."""
    import polars as pl

    from raymeta.results import query
    from raymeta.results.store import unwritten_rows

    # failed trials whose row the store refused, from this machine's record (store.record_unwritten)
    lost = [e for e in unwritten_rows(store) if sweep_name in (None, e["sweep"])]
    try:
        trials = query.unique_runs(query.load(store, "trials", sweep_name))
    except ConfigError:
        if not lost:
            raise
        trials = None
    bad = trials.filter(pl.col("status") != "completed") if trials is not None else None
    if not lost and bad.is_empty():
        click.echo(f"no failed or collapsed trials among {len(trials)}")
        return
    for row in bad.select("sweep", "trial_id", "status", "error").iter_rows() if bad is not None else ():
        click.echo(f"{row[0]}/{row[1]}: {row[2]}: {row[3]}")
    for entry in lost:
        click.echo(f"{entry['sweep']}/{entry['trial_id']}: failed, its row not written to the "
                   f"store: {entry['error']}")


def _keys(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def main() -> None:
    ray = sys.modules.get("ray")
    ours = ray is None or not ray.is_initialized()  # a caller's own Ray is left as it was
    try:
        _main()
    finally:  # shut down the Ray this command started while the interpreter is whole
        ray = sys.modules.get("ray")
        if ours and ray is not None and ray.is_initialized():
            ray.shutdown()


def entry() -> None:
    """The `raymeta` command. Once the command is done and its Ray shut down, the process ends
    without the interpreter's teardown: native threads that Ray, torch and pyarrow leave behind
    crashed (SIGSEGV) an interrupted sweep there after its message, now and then, turning exit
    code 130 into -11. A crash while the command runs still prints its stack (faulthandler)."""
    import faulthandler
    import os

    faulthandler.enable()
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code
    if code is not None and not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`) loses nothing
            stream.flush()
    os._exit(code or 0)


def _main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except StorageError as err:  # the input was fine; the store cannot take the results
        from raymeta.results.store import record_unwritten

        click.echo(f"error: {err}", err=True)
        for sweep_name, trial_id, reason in err.unwritten:
            click.echo(f"trial {trial_id} failed and its row could not be written to "
                       f"{err.store}: {reason}", err=True)
        if err.store:
            record_unwritten(err.store, err.unwritten)
        sys.exit(1)
    except RaymetaError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    entry()
