"""Trained weights as files (`ran.nn.pretrained`): the round trip through save_pretrained / from_pretrained,
create_model(pretrained=) and load_pretrained, the checks of names, shapes and files, the sources (folder,
published entry, URL, Hugging Face Hub) and their errors offline, and torch.hub's entry points."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL_KWARGS

import ran
from ran.nn import pretrained
from ran.nn.pretrained import CONFIG_FILE, WEIGHTS_FILE, PretrainedWeightsError, WeightsDownloadError

# A port nothing listens on: every download from it is refused at once, as offline.
REFUSED = "http://127.0.0.1:9"


def trained(name: str = "attention56_cifar", **kwargs) -> ran.ResidualAttentionNet:
    """A tiny network whose weights and BN statistics are not those of any initialisation."""
    torch.manual_seed(0)
    model = ran.create_model(name, **{**TINY_MODEL_KWARGS, **kwargs})
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[ran.ResidualAttentionNet, Path]:
    model = trained()
    model.save_pretrained(tmp_path / "w")
    return model, tmp_path / "w"


def logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


# --- the round trip -----------------------------------------------------------------------------------------


def test_save_pretrained_writes_the_hub_layout(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["arch"] == "attention56_cifar" and config["num_classes"] == 10
    assert (
        config["model_kwargs"]["stage_widths"] == [16, 32, 64] and config["model_kwargs"]["stem"] == "cifar"
    )
    assert config["input_size"] == [3, 32, 32]
    card = (folder / "README.md").read_text()
    assert "library_name: ran" in card and "# attention56_cifar" in card
    # readable by whoever may read the folder's other files (safetensors alone writes mode 0600)
    mode = (folder / CONFIG_FILE).stat().st_mode
    assert (folder / WEIGHTS_FILE).stat().st_mode == mode


@pytest.mark.parametrize(
    "load",
    [
        lambda folder: ran.load_pretrained(folder),
        lambda folder: ran.create_model("attention56_cifar", pretrained=folder),
        lambda folder: ran.create_model("attention56_cifar", pretrained=str(folder)),
        lambda folder: ran.ResidualAttentionNet.from_pretrained(folder),
    ],
    ids=["load_pretrained", "create_model", "create_model-str", "from_pretrained"],
)
def test_every_way_in_gives_the_saved_network(saved, load):
    model, folder = saved
    loaded = load(folder)
    assert not loaded.training and loaded.arch == "attention56_cifar"
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.pretrained_cfg["source"] == str(folder)


def test_channels_last_weights_are_saved_in_the_standard_layout(tmp_path):
    model = trained().to(memory_format=torch.channels_last)
    model.save_pretrained(tmp_path / "w")
    loaded = ran.load_pretrained(tmp_path / "w").state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value) and loaded[key].is_contiguous(), key


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("attention56_cifar", {"attention": "spatial", "learning": "nal", "mask": "local"}),
        ("attention92_cifar", {"mask": "cbam", "drop_rate": 0.1}),
        ("preact_resnet164_cifar", {}),
        ("attention56_cifar", {"unit": "postact", "groups": 4, "bottleneck_ratio": 0.5}),
    ],
)
def test_config_json_rebuilds_the_variant_with_its_switches(tmp_path, name, kwargs):
    model = trained(name, **kwargs)
    model.save_pretrained(tmp_path / "w")
    loaded = ran.load_pretrained(tmp_path / "w")
    assert loaded.arch == name and loaded.network_config() == json.loads(json.dumps(model.network_config()))
    assert torch.equal(logits(loaded), logits(model))


def test_other_num_classes_keeps_all_but_a_fresh_classifier(saved):
    model, folder = saved
    tuned = ran.create_model("attention56_cifar", pretrained=folder, num_classes=3)
    assert tuned.fc.out_features == 3 and tuned.num_classes == 3
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    for k, v in backbone.items():
        assert torch.equal(tuned.state_dict()[k], v), k


def test_a_reset_classifier_is_saved_with_its_classes(tmp_path):
    model = trained()
    model.reset_classifier(4)
    model.save_pretrained(tmp_path / "w")
    assert ran.load_pretrained(tmp_path / "w").num_classes == 4


def test_save_pretrained_refuses_a_config_of_another_shape(tmp_path):
    with pytest.raises(TypeError, match="pretrained_cfg"):
        trained().save_pretrained(tmp_path / "w", config={"hidden": 3})


# --- checks: names, shapes, files ---------------------------------------------------------------------------


def test_weights_of_another_network_are_refused_by_name(saved):
    with pytest.raises(PretrainedWeightsError, match="holds weights of attention56_cifar, not attention92"):
        ran.create_model("attention92_cifar", pretrained=saved[1])


def test_an_override_that_changes_shapes_names_the_tensors(saved):
    with pytest.raises(
        PretrainedWeightsError, match=r"of another shape \(stem.weight \(8, 3, 3, 3\) in the file"
    ):
        ran.create_model("attention56_cifar", pretrained=saved[1], stem_width=16)


def test_missing_and_unexpected_tensors_are_named(saved):
    from safetensors.torch import load_file, save_file

    folder = saved[1]
    state = load_file(folder / WEIGHTS_FILE)
    state["extra.weight"] = state.pop("fc.bias")
    save_file(state, folder / WEIGHTS_FILE)
    with pytest.raises(PretrainedWeightsError) as err:
        ran.load_pretrained(folder)
    assert "1 missing (fc.bias)" in str(err.value) and "1 unexpected (extra.weight)" in str(err.value)


@pytest.mark.parametrize(
    "damage,words",
    [
        (
            lambda f: (f / WEIGHTS_FILE).write_bytes((f / WEIGHTS_FILE).read_bytes()[:1000]),
            "not a readable safetensors",
        ),
        (lambda f: (f / WEIGHTS_FILE).unlink(), f"has no {WEIGHTS_FILE}"),
        (lambda f: (f / CONFIG_FILE).write_text("{"), "not readable JSON"),
        (lambda f: (f / CONFIG_FILE).write_text('{"format": 2}'), "this ran reads format 1"),
        (lambda f: (f / CONFIG_FILE).write_text('{"format": 1, "arch": null}'), "needs 'num_classes'"),
    ],
    ids=["truncated", "no-weights", "bad-json", "newer-format", "no-network"],
)
def test_damaged_folders_give_one_line_naming_the_file(saved, damage, words):
    damage(saved[1])
    with pytest.raises(PretrainedWeightsError, match=words) as err:
        ran.load_pretrained(saved[1])
    assert str(saved[1]) in str(err.value) and "\n" not in str(err.value)


def test_a_missing_folder_lists_the_published_entries(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="no folder of weights at .*published entry"):
        ran.load_pretrained(tmp_path / "nowhere")


def test_pretrained_true_without_published_weights_says_so():
    with pytest.raises(PretrainedWeightsError, match="no published weights for 'attention92_cifar'"):
        ran.create_model("attention92_cifar", pretrained=True)


def test_an_unknown_name_fails_before_any_download():
    with pytest.raises(ValueError, match="unknown model 'attention57'"):
        ran.create_model("attention57", pretrained=f"{REFUSED}/x")


# --- sources: published entries, URLs, the Hub --------------------------------------------------------------


@pytest.fixture
def published(tmp_path, monkeypatch, saved):
    """A checkout's weights/ with one entry, the default of attention56_cifar."""
    weights = tmp_path / "checkout" / "weights"
    weights.mkdir(parents=True)
    saved[1].rename(weights / "tiny.v1")
    monkeypatch.setattr(pretrained, "CHECKOUT_WEIGHTS", weights)
    monkeypatch.setattr(pretrained, "DEFAULT_WEIGHTS", {"attention56_cifar": "tiny.v1"})
    return saved[0], weights


def test_pretrained_true_loads_the_default_entry_of_the_checkout(published, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    model, weights = published
    assert ran.list_pretrained() == ["tiny.v1"]
    for loaded in (
        ran.create_model("attention56_cifar", pretrained=True),
        ran.create_model("attention56_cifar", pretrained="tiny.v1"),
        ran.ResidualAttentionNet.from_pretrained("tiny.v1"),
    ):
        assert loaded.pretrained_cfg["source"] == str(weights / "tiny.v1")
        assert torch.equal(logits(loaded), logits(model))


def test_an_entry_outside_a_checkout_is_downloaded_and_offline_says_so(published, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pretrained, "CHECKOUT_WEIGHTS", tmp_path / "installed" / "weights")
    monkeypatch.setenv("RAN_WEIGHTS_URL", f"{REFUSED}/weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsDownloadError) as err:
        ran.create_model("attention56_cifar", pretrained=True)
    message = str(err.value)
    assert (
        message.startswith(f"cannot download {REFUSED}/weights/tiny.v1/config.json") and "\n" not in message
    )
    assert "pass its path as pretrained" in message


@pytest.fixture
def server(tmp_path):
    """An HTTP server on localhost serving `tmp_path/www`; yields its URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()


@pytest.mark.parametrize("suffix", ["", "/", f"/{WEIGHTS_FILE}"])
def test_a_url_is_downloaded_once_into_the_torch_hub_cache(saved, server, monkeypatch, tmp_path, suffix):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url, root = server
    model, folder = saved
    folder.rename(root / "w")
    loaded = ran.load_pretrained(f"{url}/w{suffix}")
    assert torch.equal(logits(loaded), logits(model)) and loaded.pretrained_cfg["source"] == f"{url}/w"
    assert list((tmp_path / "torch" / "hub" / "ran").glob(f"w-*/{WEIGHTS_FILE}"))
    (root / "w" / WEIGHTS_FILE).unlink()  # a second load reads the cache
    assert torch.equal(logits(ran.load_pretrained(f"{url}/w{suffix}")), logits(model))


def test_a_url_that_is_not_there_is_one_line(server, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(
        WeightsDownloadError, match=r"cannot download .*/w/config.json \(HTTP 404 .*check the URL"
    ):
        ran.load_pretrained(f"{server[0]}/w")


def test_the_hub_offline_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for load in (
        lambda: ran.create_model("attention56_cifar", pretrained="hf-hub:ran-developers/attention56_cifar"),
        lambda: ran.ResidualAttentionNet.from_pretrained(
            "ran-developers/attention56_cifar", cache_dir=tmp_path
        ),
    ):
        with pytest.raises(WeightsDownloadError) as err:
            load()
        message = str(err.value)
        assert message.startswith("cannot download config.json of the Hugging Face Hub repository")
        assert "'ran-developers/attention56_cifar'" in message
        assert "\n" not in message


# --- torch.hub ----------------------------------------------------------------------------------------------


def test_torch_hub_lists_every_network_and_loads_weights(saved, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # what torch.hub.list and torch.hub.help show of a repository: its public callables and their docstrings
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entries == set(ran.list_models())
    assert "Attention-56 for CIFAR" in hubconf.attention56_cifar.__doc__
    assert "pretrained: True" in hubconf.attention56_cifar.__doc__
    model, folder = saved
    loaded = torch.hub.load(str(REPO), "attention56_cifar", source="local", pretrained=folder)
    assert torch.equal(logits(loaded), logits(model))
    plain = torch.hub.load(
        str(REPO), "attention92_cifar", source="local", num_classes=100, **TINY_MODEL_KWARGS
    )
    assert plain.num_classes == 100 and plain.training
