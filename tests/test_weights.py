"""The weights folder: resolving a plan's pretrained source inside it, and the download command."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import assert_names, write_standin_mit, write_standin_resnet

from offroadseg import weights
from offroadseg.chapters import assembly
from offroadseg.models import PretrainedUnavailable, build_model, count_parameters, segformer
from offroadseg.profiles import DEMO, FULL, ModelPlan


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: 'no hub access at all' made checkable."""
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the folder alone must keep us off the hub
    return attempts


def test_full_profile_needs_the_published_file_names():
    assert [e.name for e in weights.entries(FULL)] == ["mit-b2", "resnet101-cd907fc2.pth", "mit-b1"]
    assert weights.entries(DEMO) == []  # the demo trains from scratch


def test_without_a_folder_nothing_changes():
    for role in ("segformer", "deeplab", "student"):
        assert assembly.model_plan(FULL, role) == getattr(FULL, role)
    assert weights.resolve("segformer-b2", "nvidia/mit-b2", None) == "nvidia/mit-b2"


@pytest.mark.slow  # ~8 s on 2 cores: a real-size B1
def test_segformer_plan_resolves_inside_the_folder_without_network(tmp_path, no_network):
    source = write_standin_mit(tmp_path / "mit-b1", "b1")
    plan = assembly.model_plan(FULL, "student", weights_dir=tmp_path)
    assert plan.pretrained == str(tmp_path / "mit-b1")
    model = build_model(plan.name, pretrained=plan.pretrained, **plan.options)
    for key, value in source.segformer.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    assert round(count_parameters(model) / 1e6, 1) == 13.7  # the B1 student of the reference report
    assert no_network == []


@pytest.mark.parametrize("pretrained", ["IMAGENET1K_V1", "DEFAULT", True])
def test_resnet_plan_resolves_to_torchvision_file_name(tmp_path, no_network, monkeypatch, pretrained):
    def no_hub(*args, **kwargs):
        raise AssertionError("torch hub asked")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_hub)
    state = write_standin_resnet(tmp_path / "resnet18-f37072fd.pth", 18)  # torchvision's name for IMAGENET1K_V1
    profile = FULL.with_overrides(deeplab=ModelPlan("deeplabv3plus-resnet18", pretrained=pretrained))
    plan = assembly.model_plan(profile, "deeplab", weights_dir=str(tmp_path))
    assert plan.pretrained == str(tmp_path / "resnet18-f37072fd.pth")
    model = build_model(plan.name, pretrained=plan.pretrained)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_missing_entry_names_the_file_and_the_command(tmp_path, no_network):
    with pytest.raises(PretrainedUnavailable) as error:
        assembly.model_plan(FULL, "segformer", weights_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "mit-b2") in message and "is missing" in message
    assert f"python -m offroadseg.weights download --model segformer-b2 --pretrained nvidia/mit-b2 --to {tmp_path}" in message
    with pytest.raises(PretrainedUnavailable) as error:
        assembly.model_plan(FULL, "deeplab", weights_dir=tmp_path)
    assert_names(error, tmp_path / "resnet101-cd907fc2.pth", "download --model deeplabv3plus-resnet101")
    (tmp_path / "mit-b1").mkdir()  # a half-made copy: no config.json
    with pytest.raises(PretrainedUnavailable, match="is incomplete"):
        assembly.model_plan(FULL, "student", weights_dir=tmp_path)


def test_an_existing_path_stays_and_no_pretrained_stays_none(tmp_path):
    write_standin_resnet(tmp_path / "mine.pth", 18)
    assert weights.resolve("deeplabv3plus-resnet18", str(tmp_path / "mine.pth"), tmp_path / "w") == str(tmp_path / "mine.pth")
    assert weights.resolve("segformer-b1", None, tmp_path) is None
    assert assembly.model_plan(DEMO, "segformer", weights_dir=tmp_path) == DEMO.segformer


def test_checkpoint_of_another_size_in_the_folder_is_an_error(tmp_path, no_network):
    write_standin_mit(tmp_path / "mit-b1", "b0")  # mit-b0 weights where mit-b1 belongs
    plan = assembly.model_plan(FULL, "student", weights_dir=tmp_path)
    with pytest.raises(PretrainedUnavailable, match="do not fit segformer-b1.*of another shape"):
        build_model(plan.name, pretrained=plan.pretrained, **plan.options)


def test_key_names_of_both_transformers_formats():
    # transformers 5 lists mismatched keys as (key, shape, shape), 4.51 as plain strings.
    shapes = (torch.Size([32]), torch.Size([64]))
    assert segformer._key_names([("segformer.a", *shapes), "segformer.b"]) == ["segformer.a", "segformer.b"]


def test_fp32_keyword_follows_the_transformers_major(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.51.3")
    assert segformer._from_pretrained_dtype() == {"torch_dtype": torch.float32}
    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    assert segformer._from_pretrained_dtype() == {"dtype": torch.float32}


# --------------------------------------------------------------------------- download, network replaced


class StandInNetwork:
    """Replaces the two downloads: the hub's from_pretrained (a random small MiT in the real class) and
    torch hub's download_url_to_file (a resnet18 state dict, through a .partial file as torch does)."""

    def __init__(self, monkeypatch, tmp_path):
        import transformers

        self.hub_ids, self.urls, self.fail_saving = [], [], False
        self.scratch = tmp_path / "scratch"
        network = self

        def from_pretrained(cls, hub_id, *args, **kwargs):
            network.hub_ids.append(hub_id)
            model = write_standin_mit(network.scratch / hub_id.replace("/", "_"), "b0")
            if network.fail_saving:
                def save_then_die(folder, *a, **k):
                    Path(folder, "config.json").write_text("{}")
                    raise KeyboardInterrupt  # the session is lost halfway through
                model.save_pretrained = save_then_die
            return model

        def download_url_to_file(url, dst, hash_prefix=None, progress=True):
            network.urls.append((url, hash_prefix))
            partial = dst + ".abc.partial"
            write_standin_resnet(Path(partial), 18)
            shutil.move(partial, dst)

        monkeypatch.setattr(transformers.SegformerForImageClassification, "from_pretrained", classmethod(from_pretrained))
        monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)


def test_download_writes_exactly_the_folder_then_skips(tmp_path, monkeypatch):
    network = StandInNetwork(monkeypatch, tmp_path)
    target = tmp_path / "weights"
    assert weights.main(["download", "--profile", "full", "--to", str(target)]) == 0
    assert sorted(os.listdir(target)) == ["mit-b1", "mit-b2", "resnet101-cd907fc2.pth"]
    assert network.hub_ids == ["nvidia/mit-b2", "nvidia/mit-b1"]
    assert network.urls == [(torchvision.models.ResNet101_Weights.IMAGENET1K_V2.url, "cd907fc2")]
    assert (target / "mit-b2" / "config.json").is_file() and any((target / "mit-b2").glob("*.safetensors"))
    # What it wrote is what the plans resolve to.
    assert assembly.model_plan(FULL, "student", weights_dir=target).pretrained == str(target / "mit-b1")
    assert weights.main(["download", "--profile", "full", "--to", str(target)]) == 0
    assert len(network.hub_ids) == 2 and len(network.urls) == 1  # all there: nothing fetched again


def test_interrupted_download_never_looks_finished(tmp_path, monkeypatch):
    network = StandInNetwork(monkeypatch, tmp_path)
    network.fail_saving = True
    target = tmp_path / "weights"
    with pytest.raises(KeyboardInterrupt):
        weights.main(["download", "--model", "segformer-b1", "--pretrained", "nvidia/mit-b1", "--to", str(target)])
    assert os.listdir(target) == []  # no mit-b1, no leftover partial folder
    with pytest.raises(PretrainedUnavailable, match="is missing"):
        assembly.model_plan(FULL, "student", weights_dir=target)
    network.fail_saving = False
    weights.main(["download", "--model", "segformer-b1", "--pretrained", "nvidia/mit-b1", "--to", str(target)])
    assert os.listdir(target) == ["mit-b1"] and network.urls == []  # --model alone: only that entry


def test_offline_download_says_so_in_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    import transformers  # as the stand-in network above: transformers takes seconds to import

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.SegformerForImageClassification, "from_pretrained", classmethod(offline))
    target = tmp_path / "weights"
    assert weights.main(["download", "--model", "segformer-b1", "--pretrained", "nvidia/mit-b1", "--to", str(target)]) == 1
    err = capsys.readouterr().err
    assert str(target) in err and "huggingface.co" in err and "--weights" in err and "Traceback" not in err
    assert os.listdir(target) == []  # nothing half-written


def test_download_command_line_errors(capsys):
    with pytest.raises(SystemExit):
        weights.main(["download", "--model", "segformer-b1", "--to", "w"])
    with pytest.raises(SystemExit):
        weights.main(["download", "--model", "segformer-b1", "--pretrained", "./local", "--to", "w"])
    assert "nothing to download" in capsys.readouterr().err


@pytest.mark.parametrize("notebook, role", [("02_train_segformer", "segformer"), ("03_train_deeplab", "deeplab"),
                                            ("05_distill", "student")])
def test_training_notebooks_take_a_weights_folder(notebook, role, tmp_path):
    # ./run_all.sh --weights DIR sets the papermill parameter `weights` in each notebook that defines it;
    # the notebook must hand it to model_plan (02 and 03 through teacher_chapter), so the full profile's plan
    # resolves inside DIR.
    import nbformat

    nb = nbformat.read(Path(__file__).parents[1] / "notebooks" / f"{notebook}.ipynb", as_version=4)
    parameters = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    defaults: dict = {}
    exec(parameters.source, {}, defaults)
    assert defaults["weights"] is None
    call = next(c.source for c in nb.cells if "assembly.model_plan(" in c.source or "teachers.teacher_chapter(" in c.source)
    assert "weights_dir=weights" in call and f'"{role}"' in call
