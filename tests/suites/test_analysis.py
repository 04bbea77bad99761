"""experiments.analysis: stage responses and NAL vs ARL (Sec. 4.1 and its figure on response), soft-mask
pictures, checkpoints and the command line. Tiny networks, one thread (the CI machine has two cores)."""

from __future__ import annotations

import copy
import csv
import math
import shutil
from pathlib import Path

import datagen
import pytest
import torch
import wandb
import yaml
from conftest import wandb_records
from PIL import Image

import ran
from datamodules import CIFAR10DataModule
from experiments import analysis
from experiments.analysis import (
    AnalysisImages,
    ResponseTable,
    compare_responses,
    load_analysis_images,
    load_checkpoint_network,
    resolve_network,
    save_mask_pictures,
    stage_responses,
)
from ran.tools.pictures import mask_grid, mask_range, response_chart
from ran.train.rundir import WANDB_ID_FILE

TINY = {"stage_widths": (16, 32, 64), "stem_width": 8, "final_width": 64}
STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]

# The fake datasets are smaller than the official ones, which the data modules warn about.
pytestmark = pytest.mark.filterwarnings("ignore::datamodules.DatasetSizeWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two torch threads next to other processes on two cores make each forward 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str = "attention56_cifar", seed: int = 0, **kwargs) -> ran.ResidualAttentionNet:
    torch.manual_seed(seed)
    return ran.create_model(name, **TINY, **kwargs)


def random_uint8(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def by_hand(net: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Stem, then one stage after the other, each output's mean absolute value (on a copy of `net`)."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        h = net.stem(x)
        means = {"stem": h.abs().mean().item()}
        for name, stage in net.stages.named_children():
            h = stage(h)
            means[name] = h.abs().mean().item()
    return means


# --- stage responses ----------------------------------------------------------------------------------------


def test_one_finite_positive_response_per_stage():
    responses = stage_responses(tiny(), torch.randn(4, 3, 16, 16))
    assert list(responses) == STAGES
    assert all(isinstance(v, float) and 0 < v < float("inf") for v in responses.values())


def test_responses_match_a_hand_computation_and_leave_the_network_as_it_was():
    net = tiny().train()
    x = torch.randn(6, 3, 16, 16)
    before = copy.deepcopy(net.state_dict())
    expected = by_hand(net.eval(), x)
    net.train()
    assert stage_responses(net, x) == pytest.approx(expected, rel=1e-5)
    assert stage_responses(net, x, batch_size=4) == pytest.approx(expected, rel=1e-5)  # chunks of 4 and 2
    # BatchNorm on the batch's statistics: a copy in train mode
    assert stage_responses(net, x, bn_stats="batch") == pytest.approx(by_hand(net, x), rel=1e-5)

    assert net.training and all(m.training for m in net.modules())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics and counters untouched
    assert stage_responses(ran.create_model("preact_resnet164_cifar", **TINY), x).keys() == set(STAGES[:4])


def test_responses_refuse_uint8_images_and_other_modules():
    with pytest.raises(TypeError, match="normalize_batch"):
        stage_responses(tiny(), random_uint8(2))
    with pytest.raises(TypeError, match="ResidualAttentionNet"):
        stage_responses(torch.nn.Linear(3, 3), torch.randn(2, 3))


def test_nal_response_is_far_below_arl_at_initialisation():
    """At initialisation NAL's H = M * T scales the features by M ~ 0.5 in every module, so its stage
    responses fall an order of magnitude below ARL's (measured over 20 seeds: NAL/ARL <= 0.07 with running
    statistics, <= 0.16 with batch statistics) while the stem, before any module, is identical."""

    def spec(learning: str) -> tuple:
        return "attention164_cifar", {**TINY, "learning": learning}

    arl, nal = resolve_network(spec("arl"), seed=3), resolve_network(spec("nal"), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(arl.state_dict().values(), nal.state_dict().values()))
    for seed in (0, 1):
        x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        for bn_stats in ("running", "batch"):
            networks = {"ARL": spec("arl"), "NAL": spec("nal")}
            table = compare_responses(networks, x, seed=seed, bn_stats=bn_stats)
            arl_r, nal_r = table.responses["ARL"], table.responses["NAL"]
            assert nal_r["stem"] == pytest.approx(arl_r["stem"])
            for stage in ("stage1", "stage2", "stage3"):  # the stages with Attention Modules
                assert nal_r[stage] < 0.5 * arl_r[stage], (seed, bn_stats, stage, table.to_markdown())


def test_response_table_writes_markdown_csv_and_a_chart(tmp_path):
    table = ResponseTable(
        {
            "ARL": dict(zip(STAGES, (0.5, 5.0, 50.0, 500.0, 600.0))),
            "NAL": dict(zip(STAGES, (0.5, 0.4, 0.3, 0.2, 0.25))),
        },
        ["a note"],
    )
    md, csv_path, png = table.save(tmp_path / "out")
    text = md.read_text()
    assert "- a note" in text and "| stage | ARL | NAL | NAL / ARL |" in text
    assert "| stage2 | 50 | 0.3 | 0.006 |" in text
    with open(csv_path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["stage", "ARL", "NAL"] and [float(v) for v in rows[4][1:]] == [500.0, 0.2]
    with Image.open(png) as image:
        assert image.size == (760, 440) and image.mode == "RGB"
    linear = response_chart({"x": {"stem": 1.0, "stage1": 2.0}}, log_scale=False)
    assert linear.size == (760, 440)


def test_networks_with_different_stages_share_a_table():
    x = torch.randn(2, 3, 16, 16)
    networks = {"ResNet": ("preact_resnet164_cifar", TINY), "ARL": ("attention56_cifar", TINY)}
    table = compare_responses(networks, x)
    assert table.stages == STAGES and math.isnan(table.value("ResNet", "stage4"))
    assert table.to_markdown().splitlines()[-1].startswith("| stage4 | - | ")
    assert response_chart(table.responses).size == (760, 440)


# --- soft-mask pictures -------------------------------------------------------------------------------------


def test_one_grid_of_every_attention_module_on_one_colour_scale(tmp_path):
    net = tiny("attention92_cifar")
    images = random_uint8(5)
    path = save_mask_pictures(
        net, images, CIFAR10DataModule.MEAN, CIFAR10DataModule.STD, tmp_path, max_images=4
    )
    assert path == tmp_path / "masks.png"
    with Image.open(path) as picture:
        assert picture.mode == "RGB" and picture.width > picture.height  # 7 columns, 4 rows
    masks = net.eval().soft_masks(torch.randn(2, 3, 16, 16))
    assert len(masks) == 6 and mask_range(masks) == (0.0, 1.0)  # sigmoid masks: one fixed scale
    # the grid grows by a column per module and a row per image
    one = mask_grid(images[:1], dict(list(masks.items())[:1]))
    assert mask_grid(images[:1], masks).width > one.width and mask_grid(images[:2], masks).height > one.height
    with pytest.raises(ValueError, match="at least one soft mask"):
        mask_grid(images, {})


def test_channel_attention_shares_one_range_over_all_modules():
    masks = {"a": torch.full((1, 2, 4, 4), -0.5), "b": torch.full((1, 2, 4, 4), 0.8)}
    assert mask_range(masks) == pytest.approx((-0.5, 0.8))  # not per module, not per image


@pytest.mark.parametrize("mask", ["cbam_channel", "cbam_spatial", "cbam", "none"])
def test_mask_pictures_of_channel_and_spatial_gates(tmp_path, mask):
    path = save_mask_pictures(
        tiny(mask=mask), random_uint8(2), CIFAR10DataModule.MEAN, CIFAR10DataModule.STD, tmp_path
    )
    assert (path is None) == (mask == "none") and path == (None if mask == "none" else tmp_path / "masks.png")


def test_mask_pictures_are_logged_to_an_active_wandb_run(tmp_path, monkeypatch):
    class Run:
        def __init__(self):
            self.logged = []

        def log(self, data):
            self.logged.append(data)

    run = Run()
    monkeypatch.setattr(wandb, "run", run)
    save_mask_pictures(tiny(), random_uint8(2), CIFAR10DataModule.MEAN, CIFAR10DataModule.STD, tmp_path)
    (data,) = run.logged
    assert list(data) == ["masks/analysis"] and isinstance(data["masks/analysis"], wandb.Image)
    ResponseTable({"ARL": {"stem": 1.0, "stage1": 2.0}}).save(tmp_path / "responses")
    assert set(run.logged[1]) == {"responses/chart", "responses/table"}
    assert isinstance(run.logged[1]["responses/table"], wandb.Table)


# --- images -------------------------------------------------------------------------------------------------


def test_images_from_cifar_imagenet_trees_and_random(tmp_path):
    folder = datagen.make_cifar10(tmp_path / "c10", n_train_per_batch=10, n_test=12)
    for data_dir in (tmp_path / "c10", folder):  # the parent, or the dataset folder itself
        data = load_analysis_images("cifar10", data_dir, 5)
        assert data.images.shape == (5, 3, 32, 32) and data.images.dtype == torch.uint8
        assert "CIFAR-10 test images" in data.source
    datagen.make_imagenet_tree(tmp_path / "inet", n_train_per_class=2, n_val_per_class=2, size=40)
    data = load_analysis_images("imagenet", tmp_path / "inet", 3, image_size=32)
    assert data.images.shape == (3, 3, 32, 32) and data.images.dtype == torch.uint8
    assert "3 classes" in data.source
    noise = load_analysis_images("cifar100", None, 2, image_size=8, seed=1)
    assert isinstance(noise, AnalysisImages) and noise.images.shape == (2, 3, 8, 8)
    assert "random" in noise.source
    assert noise.normalised().dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found: expected .*nowhere"):
        load_analysis_images("cifar10", tmp_path / "nowhere", 2)


# --- checkpoints and the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """A tiny ImageClassifier after one training step on fake CIFAR-10, saved by the Trainer."""
    import pytorch_lightning as pl

    from datamodules import CIFAR10DataModule

    ImageClassifier = pytest.importorskip("ran.train.module").ImageClassifier
    root = tmp_path_factory.mktemp("ckpt")
    datagen.make_cifar10(root, n_train_per_batch=4, n_test=8)
    module = ImageClassifier("attention56_cifar", num_classes=10, model_kwargs=TINY)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=CIFAR10DataModule(str(root), batch_size=8, val_size=0))
    path = root / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, root, module.net


def test_checkpoint_round_trip(checkpoint):
    path, _, trained = checkpoint
    net = load_checkpoint_network(path)
    assert not net.training
    trained_state = trained.state_dict()
    assert all(torch.equal(v, trained_state[k]) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 16, 16)
    from_path = compare_responses({"ckpt": path}, x).responses["ckpt"]
    assert from_path == pytest.approx(stage_responses(trained, x))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_checkpoint_network(path.parent / "missing.ckpt")
    not_a_checkpoint = path.parent / "weights.pt"
    torch.save({"weights": torch.zeros(1)}, not_a_checkpoint)
    with pytest.raises(ValueError, match="weights.pt"):
        load_checkpoint_network(not_a_checkpoint)


def test_cli_on_a_checkpoint(checkpoint, tmp_path, capsys):
    path, data_root, _ = checkpoint
    assert (
        analysis.main(
            [
                "masks",
                "--ckpt",
                str(path),
                "--data-dir",
                str(data_root),
                "--num-images",
                "2",
                "--out",
                str(tmp_path / "masks"),
            ]
        )
        == 0
    )
    assert [p.name for p in (tmp_path / "masks").iterdir()] == ["masks.png"]
    assert (
        analysis.main(
            [
                "responses",
                "--ckpt",
                f"A={path}",
                "--ckpt",
                str(path),
                "--data-dir",
                str(data_root),
                "--num-images",
                "4",
                "--out",
                str(tmp_path / "resp"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| stage | A | tiny/last | tiny/last / A |" in out and "BatchNorm: running statistics" in out
    assert "the first 4 CIFAR-10 test images" in out
    written = sorted(p.name for p in (tmp_path / "resp").iterdir())
    assert written == ["responses.csv", "responses.md", "responses.png"]


def test_cli_compares_learning_rules_at_initialisation(tmp_path, capsys):
    argv = [
        "responses",
        "--model",
        "attention164_cifar",
        "--compare",
        "learning=arl,nal",
        "--num-images",
        "4",
        "--model-arg",
        "stage_widths=(16, 32, 64)",
        "--model-arg",
        "stem_width=8",
        "--model-arg",
        "final_width=64",
        "--out",
        str(tmp_path),
    ]
    assert analysis.main(argv) == 0
    out = capsys.readouterr().out
    assert "random uniform 32x32 images" in out and "BatchNorm: batch statistics" in out
    assert "| stage | learning=arl | learning=nal | learning=nal / learning=arl |" in out
    with open(tmp_path / "responses.csv") as f:
        rows = {row["stage"]: row for row in csv.DictReader(f)}
    assert float(rows["stage3"]["learning=nal"]) < float(rows["stage3"]["learning=arl"])


def run_directory(root: Path, checkpoint: Path, data_root: Path, wandb_id: str | None) -> Path:
    """A run directory as `ran fit` leaves it: the best checkpoint, config.yaml and the W&B run id."""
    run = root / "tiny-run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, run / "checkpoints" / "best.ckpt")
    config = {
        "data": {"class_path": "datamodules.CIFAR10DataModule", "init_args": {"data_dir": str(data_root)}},
        "run": {"name": "tiny-run", "project": "residual-attention", "group": "cifar10"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if wandb_id:
        (run / WANDB_ID_FILE).write_text(wandb_id + "\n")
    return run


def test_cli_attaches_pictures_and_tables_to_the_runs_offline_wandb_run(
    checkpoint, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    path, data_root, _ = checkpoint
    run = run_directory(tmp_path, path, data_root, "tinyrun1")
    assert analysis.main(["masks", "--run-dir", str(run), "--num-images", "2"]) == 0
    assert analysis.main(["responses", "--run-dir", str(run), "--num-images", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"attached to the W&B run tinyrun1 of {run}") == 2
    assert (
        "the first 2 CIFAR-10 test images" in out and "| stage | tiny-run |" in out
    )  # data from config.yaml
    assert (run / "analysis" / "masks" / "masks.png").is_file()
    assert sorted(p.name for p in (run / "analysis" / "responses").iterdir()) == [
        "responses.csv",
        "responses.md",
        "responses.png",
    ]
    wandb.teardown()  # waits until W&B's service has written the offline run files
    # W&B names a second folder of the same second "...-tinyrun1-1"
    folders = (run / "wandb").glob("offline-run-*")
    offline = sorted(f for f in folders if f.name.endswith("-tinyrun1") or "-tinyrun1-" in f.name)
    assert len(offline) == 2  # the masks, then the responses, each resuming the run's id
    logged = [
        {item.key or item.nested_key[0] for item in record.history.item}
        for folder in offline
        for record in wandb_records(folder / "run-tinyrun1.wandb")
        if record.HasField("history")
    ]
    assert {"masks/analysis"} <= set().union(*logged) and {
        "responses/chart",
        "responses/table",
    } <= set().union(*logged)
    assert len(list((offline[0] / "files" / "media" / "images" / "masks").glob("analysis_*.png"))) == 1


def test_cli_on_a_run_without_wandb_writes_files_only(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    path, data_root, _ = checkpoint
    run = run_directory(tmp_path, path, data_root, None)
    out = tmp_path / "elsewhere"
    assert analysis.main(["masks", "--run-dir", str(run), "--num-images", "2", "--out", str(out)]) == 0
    assert "has no wandb_run_id" in capsys.readouterr().out
    assert (out / "masks.png").is_file() and not (run / "wandb").exists()


@pytest.mark.parametrize(
    "argv,needle,fix",
    [
        (
            ["responses", "--ckpt", "NAL=runs/gone/checkpoints/best.ckpt"],
            "runs/gone/checkpoints/best.ckpt",
            True,
        ),
        (["masks", "--ckpt", "runs/nowhere/last.ckpt"], "runs/nowhere/last.ckpt", True),
        (["responses", "--model", "attention56_cifar", "--data-dir", "{tmp}/no_data"], "{tmp}/no_data", True),
        (["masks", "--ckpt", "{ckpt}", "--data-dir", "{tmp}/no_data"], "{tmp}/no_data", True),
        (["responses", "--compare", "learning=arl,nal"], "--compare needs --model", False),
        (["responses", "--model", "attention1000"], "unknown model 'attention1000'", False),
        (["responses"], "nothing to measure", False),
        (["masks", "--run-dir", "{tmp}/no_run"], "{tmp}/no_run/checkpoints/best.ckpt", True),
    ],
)
def test_cli_errors_name_the_problem_and_exit_non_zero(tmp_path, capsys, argv, needle, fix):
    (tmp_path / "a.ckpt").write_bytes(b"")  # exists: the data folder is checked before the checkpoint is read
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(tmp_path / "a.ckpt")) for a in argv]
    assert analysis.main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert needle.replace("{tmp}", str(tmp_path)) in err
    assert ("Fix:" in err) == fix
    assert not (tmp_path / "out").exists()
