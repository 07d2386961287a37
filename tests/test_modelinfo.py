"""The inference record a model file carries (offroadseg.modelinfo): built, validated, and read back
from a checkpoint dict, a checkpoint file, an ONNX file and an onnx ModelProto."""

import json

import onnx
import pytest
from onnx import TensorProto, helper

from offroadseg import modelinfo
from offroadseg.checkpoints import save_checkpoint
from offroadseg.classes import CLASS_NAMES, COLORS, RAW_IDS
from offroadseg.preprocess import IMAGENET_MEAN, IMAGENET_STD


def _identity_onnx() -> onnx.ModelProto:
    """The smallest valid ONNX model: an image in, the same out."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "identity", [image], [logits])
    return helper.make_model(graph)


def test_record_holds_what_inference_needs_in_plain_types():
    spec = {"name": "segformer-b0", "options": {"drop_path": 0.1, "sizes": (1, 2)}}
    info = modelinfo.inference_info((160.0, 288), tta_flips=("h", "hv"), spec=spec)
    assert info["format"] == modelinfo.INFO_FORMAT
    assert info["input_size"] == [160, 288] and all(type(s) is int for s in info["input_size"])
    assert info["mean"] == list(IMAGENET_MEAN) and info["std"] == list(IMAGENET_STD)
    assert info["classes"] == [{"name": n, "raw_id": r, "color": list(c)} for n, r, c in zip(CLASS_NAMES, RAW_IDS, COLORS)]
    assert info["tta_flips"] == ["h", "hv"]
    # The spec is copied as JSON would keep it: tuples become lists, and the caller's dict stays its own.
    assert info["spec"] == {"name": "segformer-b0", "options": {"drop_path": 0.1, "sizes": [1, 2]}}
    spec["options"]["drop_path"] = 0.5
    assert info["spec"]["options"]["drop_path"] == 0.1
    assert json.loads(modelinfo.to_json(info)) == info
    assert modelinfo.inference_info((8, 8))["spec"] is None and modelinfo.inference_info((8, 8))["tta_flips"] == []


def test_record_rejects_bad_sizes_and_flips():
    with pytest.raises(ValueError, match="input_size"):
        modelinfo.inference_info((0, 10))
    with pytest.raises(ValueError, match="flip") as error:
        modelinfo.inference_info((8, 8), tta_flips=("x",))
    assert "'h'" in str(error.value)  # names the flips it takes


@pytest.mark.parametrize("text, size", [("160x288", (160, 288)), ("512X512", (512, 512)), (" 8x16 ", (8, 16))])
def test_parse_input_size_reads_height_x_width(text, size):
    assert modelinfo.parse_input_size(text) == size


@pytest.mark.parametrize("text, message", [("160", "HxW"), ("160x", "HxW"), ("axb", "HxW"), ("1x2x3", "HxW"),
                                           ("0x288", "positive"), ("160x-1", "positive")])
def test_parse_input_size_says_the_form_it_takes(text, message):
    with pytest.raises(ValueError, match=message):
        modelinfo.parse_input_size(text)


def test_checkpoint_dict_and_file_round_trip(tmp_path):
    info = modelinfo.inference_info((32, 48), tta_flips=("v",), spec={"name": "deeplabv3plus-resnet18"})
    assert modelinfo.read_inference_info({"model": {}, "inference": info}) == info
    path = tmp_path / "models" / "student" / "best.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint({"model": {}, "inference": info}, path)
    assert modelinfo.read_inference_info(path) == info
    assert modelinfo.read_inference_info(str(path)) == info


def test_files_from_before_the_record_read_as_none(tmp_path):
    assert modelinfo.read_inference_info({"model": {}}) is None  # an old checkpoint
    assert modelinfo.read_inference_info({"model": {}, "inference": None}) is None  # fit without a record
    path = tmp_path / "old.pt"
    save_checkpoint({"model": {}}, path)
    assert modelinfo.read_inference_info(path) is None
    onnx_path = tmp_path / "old.onnx"
    onnx.save(_identity_onnx(), str(onnx_path))
    assert modelinfo.read_inference_info(onnx_path) is None


def test_a_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="best.pt: no checkpoint there"):
        modelinfo.read_inference_info(tmp_path / "best.pt")


def test_onnx_file_and_proto_round_trip(tmp_path):
    info = modelinfo.inference_info((64, 96), tta_flips=("h",))
    model = _identity_onnx()
    model.metadata_props.add(key="producer_note", value="kept")
    modelinfo.set_onnx_info(model, info)
    assert modelinfo.onnx_info(model) == info
    path = tmp_path / "student.ONNX"  # the suffix is read case-blind
    onnx.save(model, str(path))
    assert modelinfo.read_inference_info(path) == info
    assert modelinfo.read_inference_info(onnx.load(str(path))) == info  # a loaded ModelProto
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["producer_note"] == "kept"


def test_setting_a_record_replaces_the_earlier_one():
    proto = onnx.ModelProto()
    modelinfo.set_onnx_info(proto, modelinfo.inference_info((8, 8)))
    modelinfo.set_onnx_info(proto, modelinfo.inference_info((16, 8)))  # replaces, never duplicates
    assert len(proto.metadata_props) == 1 and modelinfo.onnx_info(proto)["input_size"] == [16, 8]


def test_an_incomplete_record_is_never_stored():
    proto = onnx.ModelProto()
    with pytest.raises(ValueError, match=r"lacks \['mean', 'std'\]"):
        modelinfo.set_onnx_info(proto, {"input_size": [8, 8], "classes": []})
    assert len(proto.metadata_props) == 0


def test_incomplete_records_name_the_file_and_the_fix(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {}, "inference": {"input_size": [8, 8]}}, path)
    with pytest.raises(ValueError, match="best.pt: inference record lacks") as error:
        modelinfo.read_inference_info(path)
    assert "'mean'" in str(error.value) and "'classes'" in str(error.value)
    assert "re-export or retrain" in str(error.value)
    with pytest.raises(ValueError, match="checkpoint: inference record lacks"):
        modelinfo.read_inference_info({"inference": {"mean": [0, 0, 0]}})


def test_a_record_from_newer_code_asks_for_an_update(tmp_path):
    info = dict(modelinfo.inference_info((8, 8)), format=modelinfo.INFO_FORMAT + 1)
    with pytest.raises(ValueError, match="newer than this code reads.*update offroadseg"):
        modelinfo.read_inference_info({"inference": info})
    assert modelinfo.validate(dict(info, format=modelinfo.INFO_FORMAT)) is not None
    no_format = {k: v for k, v in info.items() if k != "format"}
    assert modelinfo.validate(no_format) == no_format  # a record without "format" reads as this one


def test_broken_onnx_metadata_names_the_file_and_says_re_export(tmp_path):
    model = _identity_onnx()
    model.metadata_props.add(key=modelinfo.INFO_KEY, value="{not json")
    path = tmp_path / "student.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="student.onnx: its offroadseg_inference metadata is not valid JSON") as error:
        modelinfo.read_inference_info(path)
    assert "re-export the model" in str(error.value)
    with pytest.raises(ValueError, match="model file: .*lacks"):
        modelinfo.from_json(json.dumps({"input_size": [8, 8]}))
