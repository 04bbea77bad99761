"""`python -m ran.bench` runs end to end and reports every figure (speed itself is never asserted here)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from datamodules import CIFAR10DataModule, ImageNetDataModule, normalize_batch
from ran.nn.registry import create_model
from ran.tools.bench import main
from ran.tools.measure import data_throughput

TINY = '{"stage_widths": [16, 32, 64], "stem_width": 8, "final_width": 64}'
KEYS = {
    "train_img_s",
    "infer_img_s",
    "fwd_macs",
    "gemm_fp32_gflops",
    "gemm_bf16_gflops",
    "mfu_train_fp32",
    "peak_memory_mb",
    "train_step_ms",
}


def test_bench_reports_every_figure_as_json_on_the_last_line(capsys):
    result = main(
        [
            "--model",
            "attention56_cifar",
            "--model-kwargs",
            TINY,
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--blocks",
            "2",
            "--steps-per-block",
            "1",
            "--gemm-size",
            "128",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(result))
    assert KEYS <= set(result)
    assert result["fwd_macs"] > 0 and result["train_img_s"] > 0 and result["infer_img_s"] > 0
    assert len(result["train_step_ms_blocks"]) == 2
    expected_mfu = 3 * 2 * result["fwd_macs"] * result["train_img_s"] / (result["gemm_fp32_gflops"] * 1e9)
    assert abs(result["mfu_train_fp32"] - expected_mfu) < 1e-9
    assert any(line.startswith("train: ") for line in out) and any(line.startswith("GEMM ") for line in out)
    # MFU is taken against the faster of torch.mm and oneDNN's GEMM (the convolutions' library on a CPU).
    for key in ("fp32", "bf16"):
        by_library = (result[f"gemm_{key}_mm_gflops"], result[f"gemm_{key}_onednn_gflops"])
        assert result[f"gemm_{key}_gflops"] == max(by_library) and min(by_library) > 0


def test_bench_bf16_uses_the_bf16_gemm(capsys):
    result = main(
        [
            "--model",
            "attention56_cifar",
            "--model-kwargs",
            TINY,
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--blocks",
            "1",
            "--steps-per-block",
            "1",
            "--gemm-size",
            "128",
            "--precision",
            "bf16-mixed",
        ]
    )
    assert "mfu_train_bf16" in result and "mfu_train_fp32" not in result


def test_bench_data_mode_times_the_cifar_training_batches(cifar10_dir, capsys):
    # 200 fake training images at batch 32: seven batches, the first (start-up) untimed.
    result = main(["--data", "cifar10", "--data-dir", str(cifar10_dir), "--batch-size", "32"])
    assert result["data_img_s"] > 0 and result["data_images"] == 200 - 32
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (last["data"], last["data_workers"]) == ("cifar10", 0)
    # --data-images stops the timing once that many images have been counted.
    assert (
        main(
            ["--data", "cifar10", "--data-dir", str(cifar10_dir), "--batch-size", "32", "--data-images", "40"]
        )["data_images"]
        == 64
    )


def test_bench_data_mode_needs_the_data_folder():
    with pytest.raises(SystemExit, match="--data cifar10 needs --data-dir"):
        main(["--data", "cifar10"])


def test_train_batches_are_the_augmented_training_batches_on_the_device(cifar10_dir):
    """`train_batches` is training's path: the shuffled training split, moved to the device, augmented and
    normalised there; with `augment=False` the same order, normalised only."""
    batches = {}
    for augment in (True, False):
        dm = CIFAR10DataModule(data_dir=str(cifar10_dir), batch_size=32, val_size=0, augment=augment)
        dm.setup("fit")
        torch.manual_seed(0)  # the shuffle's order
        batches[augment] = list(dm.train_batches("cpu"))
    labels = torch.cat([y for _, y in batches[True]])
    assert torch.equal(labels.sort().values, dm.train_labels.sort().values)
    assert torch.equal(labels, torch.cat([y for _, y in batches[False]]))
    images = torch.cat([x for x, _ in batches[True]])
    plain = torch.cat([x for x, _ in batches[False]])
    assert images.dtype == plain.dtype == torch.float32 and images.shape == plain.shape == (200, 3, 32, 32)
    assert not torch.equal(images, plain)  # cropped and flipped
    # Unaugmented, each batch image is a normalised training image, with its own label.
    normalised = normalize_batch(dm.train_dataset.images, dm.MEAN, dm.STD).flatten(1)
    distance, index = torch.cdist(
        plain.flatten(1), normalised, compute_mode="donot_use_mm_for_euclid_dist"
    ).min(1)
    assert distance.max() < 1e-3 and torch.equal(dm.train_labels[index], labels)
    assert len(set(index.tolist())) == 200  # every image once


def test_data_throughput_counts_the_batches_after_the_first(cifar10_dir):
    dm = CIFAR10DataModule(data_dir=str(cifar10_dir), batch_size=50, val_size=0)
    result = data_throughput(dm, torch.device("cpu"), images=10_000)
    assert result["data_images"] == 150 and result["data_img_s"] > 0


def test_bench_epoch_mode_times_a_real_epoch(tmp_path, capsys):
    import datagen

    datagen.make_cifar10(tmp_path, n_train_per_batch=20, n_test=20)
    result = main(
        [
            "--model",
            "attention56_cifar",
            "--model-kwargs",
            TINY,
            "--batch-size",
            "16",
            "--warmup",
            "1",
            "--blocks",
            "1",
            "--steps-per-block",
            "1",
            "--gemm-size",
            "128",
            "--epoch",
            "--data-dir",
            str(tmp_path),
            "--val-size",
            "20",
        ]
    )
    assert result["epoch_images"] == 80 and result["epoch_steps"] == 5 and result["epoch_s"] > 0
    assert result["epoch_over_pure_steps"] == pytest.approx(
        result["epoch_s"] / (5 * result["epoch_pure_step_ms"] / 1e3)
    )
    assert result["epoch_pure_step_ms"] <= result["train_step_ms"]  # the faster of before and after the epoch
    assert "epoch: " in capsys.readouterr().out


def test_bench_profile_lists_the_top_operators(capsys):
    result = main(
        [
            "--model",
            "attention56_cifar",
            "--model-kwargs",
            TINY,
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--blocks",
            "1",
            "--steps-per-block",
            "1",
            "--gemm-size",
            "128",
            "--profile",
            "8",
        ]
    )
    rows = result["profile"]
    assert len(rows) == 8
    ops = [r["op"] for r in rows]
    assert "aten::convolution_backward" in ops or "aten::mkldnn_convolution" in ops
    assert [r["self_ms_per_step"] for r in rows] == sorted(
        (r["self_ms_per_step"] for r in rows), reverse=True
    )
    assert all(0 < r["share"] <= 1 for r in rows) and sum(r["share"] for r in rows) <= 1 + 1e-6
    # Three profiled steps: every convolution of the network runs once per step.
    convs = sum(
        isinstance(m, torch.nn.Conv2d)
        for m in create_model("attention56_cifar", **json.loads(TINY)).modules()
    )
    conv = next(r for r in rows if r["op"] in ("aten::convolution_backward", "aten::mkldnn_convolution"))
    assert conv["calls_per_step"] == convs
    # The host's work per step: at least a forward and a backward operator per convolution
    assert result["aten_calls_per_step"] >= 2 * convs and "launches_per_step" not in result  # no CUDA here
    out = capsys.readouterr().out
    assert "top 8 operators by self CPU time, per training step:" in out
    assert f"aten calls per step: {result['aten_calls_per_step']:.0f}" in out


def test_data_throughput_times_the_imagenet_training_batches(imagenet_dir):
    dm = ImageNetDataModule(data_dir=str(imagenet_dir), batch_size=8, num_workers=0, image_size=32)
    result = data_throughput(dm, torch.device("cpu"), images=10_000)
    assert result["data_images"] == 24 - 8 and result["data_img_s"] > 0


def test_bench_packed_trains_copies_side_by_side_and_sums_them(capsys):
    """Two copies at once, as `experiments run --parallel 2` packs runs on one GPU: each its own process
    with half the cores, the total their sum."""
    args = ["--model", "attention56_cifar", "--model-kwargs", TINY, "--batch-size", "4", "--warmup", "1"]
    result = main([*args, "--blocks", "1", "--steps-per-block", "1", "--packed", "2"])
    assert result["packed"] == 2 and len(result["train_img_s_each"]) == 2
    assert all(v > 0 for v in result["train_img_s_each"])
    assert result["train_img_s_total"] == pytest.approx(sum(result["train_img_s_each"]), rel=1e-2)
    assert result["threads"] == max(1, (os.cpu_count() or 1) // 2) and "gemm_fp32_gflops" not in result
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("2 copies at once: ") and json.loads(out[-1]) == result


def test_bench_times_the_imagenet_shards_beside_the_tree(imagenet_dir, tmp_path, capsys):
    import datagen

    shards = datagen.make_imagenet_shards(imagenet_dir, tmp_path / "shards")
    args = ["--data", "imagenet", "--workers", "0", "--batch-size", "8"]
    result = main([*args, "--format", "litdata", "--data-dir", str(shards)])
    assert result["data_format"] == "litdata" and result["data_decode"] == "cpu"
    assert result["data_images"] == 24 - 8 and result["data_img_s"] > 0
    assert "data pipeline (imagenet, litdata, cpu decode): " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="apply to --data imagenet"):
        main(["--data", "cifar10", "--data-dir", str(tmp_path), "--format", "litdata"])


def test_bench_cuda_graph_needs_a_cuda_device():
    with pytest.raises(
        SystemExit, match="--cuda-graph captures CUDA graphs, which cpu has not: use --device cuda"
    ):
        main(["--model", "attention56_cifar", "--device", "cpu", "--cuda-graph", "--model-kwargs", TINY])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the captured step")
def test_bench_cuda_graph_times_the_captured_step(capsys):
    result = main(
        ["--model", "attention56_cifar", "--device", "cuda", "--cuda-graph", "--model-kwargs", TINY]
    )
    assert result["cuda_graph"] is True and result["train_img_s"] > 0
