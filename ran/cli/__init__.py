"""The `ran` command: `ran fit|validate|test|predict` (LightningCLI) and `ran summary`.

    ran fit -c experiments/configs/cifar10/attention92.yaml                      # train
    ran fit -c experiments/configs/cifar10/attention92.yaml --ckpt_path auto     # start or resume the run
    ran test -c experiments/configs/cifar10/attention92.yaml --ckpt_path best    # test its best checkpoint
    ran fit -c experiments/configs/cifar10/attention92.yaml --print_config       # the merged config

Config inheritance (`__base__`): see `ran.train.config`; the config `ran fit` resolves: `ran.cli.resolve`.
The package: `main` (dispatch and errors), `app` (`RanCLI`), `runs` (the run directory), `meta` (the record).

Runs: each run lives in `<run.root>/<run.name>` (default `runs/<name>`): `config.yaml` (the resolved config;
`config_<stage>.yaml` for validate/test/predict), `checkpoints/best.ckpt` (by val/acc1) and
`checkpoints/last.ckpt`, `results.json` (final metrics, see `ran.train.results`), the W&B files under `wandb/`
or `csv/version_N/metrics.csv`.
`ran fit` refuses an existing run directory unless it resumes (`--ckpt_path auto|last|best|PATH`, or a SLURM
requeue that left `hpc_ckpt_N.ckpt`) or `--run.overwrite true` is given; `auto` starts a run that has no
checkpoint yet. Every stage holds the run directory's lock (`run.lock`, `ran.train.lock`) while it runs; a
second process on the run is refused, naming the holder. In a W&B sweep trial, the agent's run id is the
run's, and it is appended to the run name (one directory per trial).

The W&B record: each stage of a run is a W&B run of its own, in the run's group (`--run.group`) and with the
stage as its `job_type`: `ran fit` logs to `<name>` (its id kept in `wandb_run_id`, so a resumed fit continues
it), `ran validate|test|predict` to `<name>-<stage>` (id in `wandb_run_id_<stage>`; testing again continues
that run). Testing therefore never rewrites the fit's config, and a dashboard filters stages by job type. Each
W&B run's config is the resolved config that stage ran with, plus `meta`: the stage, the `-c` config files,
the seed, the git commit and whether the checkout had changes, the package versions and, for the evaluating
stages, the fit's W&B id; `run.suite`, `run.budget` and `run.factors` are set by `python -m experiments run`.

Loggers: `--run.logger wandb|csv|none` picks ran's logger; `--trainer.logger` adds more (e.g. a
TensorBoardLogger). A WandbLogger or CSVLogger given there gets ran's settings (run directory, W&B id, name,
project, `--run.entity`, group, tags, job type) for every argument it leaves at its default, so W&B options
such as `--trainer.logger.log_model all` pass through; one of the same kind as `--run.logger` replaces ran's.
With any logger, the learning rate and Lightning's ThroughputMonitor (images/s; FLOPs/s and MFU on GPUs whose
peak Lightning knows) are logged too.
"""

from __future__ import annotations

from ran.cli.main import main

__all__ = ["main"]
