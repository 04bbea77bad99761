"""`ran.cli.resolve.resolve_config`: a run's config as `ran fit` resolves it, without running anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ran.cli.main import main as ran_main
from ran.cli.resolve import device_count, resolve_config
from ran.train.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
BUDGETS = Path(__file__).resolve().parents[2] / "experiments" / "budgets"


def test_the_resolved_config_is_what_ran_fit_prints(capsys):
    """The same files and overrides give the config that `ran fit --print_config` prints, key for key."""
    args = [
        "-c",
        str(CONFIGS / "cifar100" / "attention56.yaml"),
        "-c",
        str(BUDGETS / "cifar" / "cpu-mini.yaml"),
        "--model.learning",
        "nal",
        "--data.batch_size",
        "32",
        "--trainer.devices=[0,1]",
    ]
    assert ran_main(["fit", *args, "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    printed.pop("config", None)
    resolved = resolve_config(args)
    assert yaml.safe_load(yaml.safe_dump(resolved.config)) == printed
    assert resolved.data["batch_size"] == 32 and resolved.data["download"] is False  # the budget overlay
    assert resolved.trainer["devices"] == [0, 1] and resolved.devices == 2 and resolved.nodes == 1


def test_network_arguments_and_classes_come_from_the_config_and_the_datamodule_class():
    cifar100 = resolve_config(
        ["-c", str(CONFIGS / "cifar100" / "attention92.yaml"), "--model.attention", "spatial"]
    )
    assert cifar100.model["arch"] == "attention92_cifar"
    assert cifar100.num_classes == 100  # CIFAR100DataModule.NUM_CLASSES
    assert cifar100.network_kwargs == {"attention": "spatial", "learning": None, "mask": None}
    mini = resolve_config(
        ["-c", str(CONFIGS / "cifar10" / "attention56.yaml"), "-c", str(BUDGETS / "cifar" / "smoke.yaml")]
    )
    assert mini.num_classes == 10
    assert mini.network_kwargs == {
        "attention": None,
        "learning": None,
        "mask": None,
        "stage_widths": [16, 32, 64],
        "stem_width": 8,
        "final_width": 64,
    }
    # ImageNet: ILSVRC's 1000 unless the config states the classes of its tree.
    imagenet = ["-c", str(CONFIGS / "imagenet" / "attention56.yaml")]
    assert resolve_config(imagenet).num_classes == 1000  # ImageNetDataModule.NUM_CLASSES
    assert resolve_config([*imagenet, "--data.num_classes", "200"]).num_classes == 200
    assert resolve_config(imagenet).devices == 8


def test_resolving_touches_no_run_directory(tmp_path):
    """`ran fit` refuses an existing run directory; resolving its config neither refuses nor creates one."""
    (tmp_path / "taken" / "checkpoints").mkdir(parents=True)
    config = ["-c", str(CONFIGS / "cifar10" / "attention56.yaml"), "--run.root", str(tmp_path)]
    assert resolve_config([*config, "--run.name", "taken"]).config["run"]["name"] == "taken"
    resolve_config([*config, "--run.name", "fresh"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_bad_overrides_are_one_clear_error():
    config = ["-c", str(CONFIGS / "cifar10" / "attention56.yaml")]
    with pytest.raises(ConfigError, match="unrecognized arguments: --trainer.devic 2"):  # never abbreviated
        resolve_config([*config, "--trainer.devic", "2"])
    with pytest.raises(ConfigError, match="expected one argument"):
        resolve_config([*config, "--trainer.devices"])
    with pytest.raises(ConfigError, match="File does not exist"):
        resolve_config(["-c", str(CONFIGS / "nowhere.yaml")])


@pytest.mark.parametrize("devices,count", [(4, 4), ([0, 1], 2), ("3", 3), ("0,1,2", 3), ([2], 1)])
def test_device_count(devices, count):
    assert device_count(devices) == count


@pytest.mark.parametrize("devices", ["auto", -1, 0, "-1", []])
def test_a_machine_dependent_device_count_is_refused(devices):
    with pytest.raises(ConfigError, match="give a number or a list"):
        device_count(devices)
