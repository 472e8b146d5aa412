"""Model bundles: a round trip keeps the model exactly, and every broken or hostile file is refused
with a message naming the file and the reason, before any code in it could run."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.bundles import BundleError, ModelBundle, load_bundle, save_bundle
from workers.models import PrecedentModel, build_model
from workers.preprocess import InputSpec

LABELS = ("normal", "benign", "malignant")
SPEC = InputSpec(size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def seeded_model(architecture: str = "cnn4", num_classes: int = 3) -> PrecedentModel:
    torch.manual_seed(3)
    return build_model(architecture, num_classes).eval()


def fixed_input() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def valid_content() -> dict[str, Any]:
    """What a valid cnn4 bundle holds; tests break one part of a copy of it."""
    model = seeded_model()
    return {
        "format": "precedent-model-bundle",
        "format_version": 1,
        "architecture": "cnn4",
        "labels": list(LABELS),
        "input": {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "clinical_use": False,
        "description": {"data_set": "phantoms"},
        "state_dict": model.state_dict(),
    }


def written(path: Path, content: object) -> Path:
    torch.save(content, path)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(BundleError) as raised:
        load_bundle(path)
    message = str(raised.value)
    assert message.startswith(f"model bundle {path}: ")
    assert raised.value.path == path
    return message


@pytest.mark.parametrize("architecture", ["cnn4", "cnn_lstm", "mobilenet_v2"])
def test_a_saved_bundle_loads_back_with_the_same_model(tmp_path: Path, architecture: str) -> None:
    model = seeded_model(architecture)
    path = tmp_path / "model.pt"
    description = {"data_set": "phantoms", "metrics": {"auc": 0.91}, "seed": 3, "splits": (0.8, 0.2)}
    bundle_id = save_bundle(
        path, model, architecture=architecture, labels=LABELS, input_spec=SPEC, description=description
    )
    bundle = load_bundle(path)
    assert bundle_id == bundle.id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (bundle.path, bundle.architecture, bundle.labels) == (path, architecture, LABELS)
    assert bundle.input == SPEC
    assert bundle.clinical_use is False
    assert bundle.description == {**description, "splits": [0.8, 0.2]}
    restored = bundle.instantiate()
    assert not restored.training
    with torch.no_grad():
        assert torch.equal(restored(fixed_input()), model(fixed_input()))


def test_instances_are_independent_of_the_bundle_and_of_each_other(tmp_path: Path) -> None:
    save_bundle(tmp_path / "m.pt", seeded_model(), architecture="cnn4", labels=LABELS, input_spec=SPEC)
    bundle = load_bundle(tmp_path / "m.pt")
    first, second = bundle.instantiate(), bundle.instantiate()
    with torch.no_grad():
        first.get_parameter("head.weight").zero_()
    assert not torch.equal(second.get_parameter("head.weight"), first.get_parameter("head.weight"))
    assert not torch.equal(bundle.state_dict["head.weight"], first.get_parameter("head.weight"))


def test_saving_replaces_a_bundle_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "models" / "m.pt"
    first = save_bundle(path, seeded_model(), architecture="cnn4", labels=LABELS, input_spec=SPEC)
    second = save_bundle(
        path, seeded_model(), architecture="cnn4", labels=LABELS, input_spec=SPEC, clinical_use=True
    )
    assert first != second
    assert load_bundle(path).clinical_use is True
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]


def test_a_bundle_is_readable_as_any_new_file_is(tmp_path: Path) -> None:
    """Not mkstemp's owner-only mode: workers may run as another user."""
    old_mask = os.umask(0o022)
    try:
        save_bundle(tmp_path / "m.pt", seeded_model(), architecture="cnn4", labels=LABELS, input_spec=SPEC)
    finally:
        os.umask(old_mask)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"labels": ["normal", "benign", "benign"]}, "labels must be unique (got 'benign' twice)"),
        ({"architecture": "cnn5"}, "unknown architecture 'cnn5'"),
        ({"labels": ["normal", "malignant"]}, "weights do not fit cnn4 with 2 classes"),
        ({"description": {"when": object()}}, "description.when must hold only strings"),
    ],
)
def test_saving_refuses_what_loading_would_refuse_and_writes_nothing(
    tmp_path: Path, change: dict[str, Any], reason: str
) -> None:
    arguments: dict[str, Any] = {"architecture": "cnn4", "labels": LABELS, "input_spec": SPEC, **change}
    with pytest.raises(BundleError, match=r"model bundle .*m\.pt: " + re.escape(reason)):
        save_bundle(tmp_path / "m.pt", seeded_model(), **arguments)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    assert refusal(tmp_path / "absent.pt").endswith("no such file")


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert "is a directory" in refusal(tmp_path)


def test_an_unreadable_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = written(tmp_path / "m.pt", {})

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads through chmod 000
    assert refusal(path).endswith("cannot read it (Permission denied)")


@pytest.mark.parametrize(
    "content",
    [b"", b"definitely not a torch file\n", b"PK\x03\x04" + b"\x00" * 64],
    ids=["empty", "text", "zip-header-only"],
)
def test_a_file_that_is_not_a_torch_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    assert "not a torch file" in refusal(path)


def test_a_truncated_bundle_is_refused(tmp_path: Path, valid_content: dict[str, Any]) -> None:
    data = written(tmp_path / "whole.pt", valid_content).read_bytes()
    path = tmp_path / "m.pt"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in refusal(path)


def test_a_bundle_with_a_corrupted_zip_directory_is_refused(
    tmp_path: Path, valid_content: dict[str, Any]
) -> None:
    data = bytearray(written(tmp_path / "m.pt", valid_content).read_bytes())
    directory = data.rfind(b"PK\x01\x02")  # the central directory's first entry
    data[directory : directory + 4] = b"XXXX"
    (tmp_path / "m.pt").write_bytes(bytes(data))
    assert "truncated or corrupt" in refusal(tmp_path / "m.pt")


class Payload:
    """Unpickling this runs a shell command: what a hostile 'model' file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_the_hostile_payload_is_live_when_unpickled_naively(tmp_path: Path) -> None:
    """Proves the next test's payload would run if anything unpickled it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))  # unsafe on purpose: proves the payload
    assert marker.exists()


@pytest.mark.parametrize("framing", ["torch.save", "bare pickle"])
def test_a_bundle_that_would_run_code_is_refused_without_running_it(
    tmp_path: Path, valid_content: dict[str, Any], framing: str
) -> None:
    marker = tmp_path / "pwned"
    hostile = {**valid_content, "description": {"note": Payload(marker)}}
    path = tmp_path / "m.pt"
    if framing == "torch.save":
        torch.save(hostile, path)
    else:
        path.write_bytes(pickle.dumps(hostile, protocol=2))  # the protocol torch.load expects
    message = refusal(path)
    assert re.search(r"refused: it asks to load Python code \((posix|os)\.system\)", message)
    assert "nothing in it ran" in message
    assert not marker.exists()


def test_a_pickle_of_a_newer_protocol_is_refused_as_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(pickle.dumps({"format": "precedent-model-bundle"}, protocol=5))
    with pytest.warns(UserWarning, match="pickle protocol"):
        assert (
            "not a torch file, or a truncated or corrupt one (UnpicklingError: Unsupported operand"
            in refusal(path)
        )


def break_content(valid: dict[str, Any], **changes: Any) -> dict[str, Any]:
    content = {**valid, **changes}
    return {k: v for k, v in content.items() if v is not DROP}


DROP = object()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"format": "something-else"}, "not a Precedent model bundle (format marker 'something-else'"),
        ({"format": DROP}, "not a Precedent model bundle (format marker None"),
        ({"format_version": 2}, "format version 2 is not supported (this version reads 1)"),
        ({"format_version": True}, "format version True is not supported"),
        ({"architecture": "resnet18"}, "unknown architecture 'resnet18' (known: densenet121, vgg16_lstm"),
        ({"labels": []}, "labels must be a non-empty list of names (got [])"),
        ({"labels": DROP}, "labels must be a non-empty list of names (got None)"),
        ({"labels": ["normal", "benign", "benign"]}, "labels must be unique (got 'benign' twice)"),
        ({"labels": ["normal", "", "malignant"]}, "every label must be a non-empty string (got '')"),
        ({"labels": ["normal", 2, "malignant"]}, "every label must be a non-empty string (got 2)"),
        ({"input": [64]}, "input must be a dict with size, mean and std"),
        (
            {"input": {"size": 16, "mean": [0.5] * 3, "std": [0.2] * 3}},
            "input size must be an integer of at least 32",
        ),
        ({"input": {"size": 64.0, "mean": [0.5] * 3, "std": [0.2] * 3}}, "input size must be an integer"),
        ({"input": {"size": 9999, "mean": [0.5] * 3, "std": [0.2] * 3}}, "input: input size must be between"),
        ({"input": {"size": 64, "mean": [0.5] * 2, "std": [0.2] * 3}}, "input mean must be 3 finite numbers"),
        ({"input": {"size": 64, "mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}}, "input std must be positive"),
        (
            {"input": {"size": 64, "mean": [0.5, float("nan"), 0.5], "std": [0.2] * 3}},
            "input mean must be 3 finite",
        ),
        ({"clinical_use": "yes"}, "clinical_use must be true or false (got 'yes')"),
        ({"description": ["x"]}, "description must be a dict (got list)"),
        ({"state_dict": DROP}, "state_dict must be a dict of names to tensors"),
        ({"state_dict": {"head.weight": [1.0]}}, "state_dict must be a dict of names to tensors"),
    ],
)
def test_a_bundle_with_a_bad_field_is_refused_saying_which(
    tmp_path: Path, valid_content: dict[str, Any], changes: dict[str, Any], reason: str
) -> None:
    path = written(tmp_path / "m.pt", break_content(valid_content, **changes))
    assert reason in refusal(path)


def test_a_file_holding_something_other_than_a_dict_is_refused(tmp_path: Path) -> None:
    assert "not a model bundle (holds a list, not a dict)" in refusal(written(tmp_path / "m.pt", [1, 2]))


def test_weights_missing_a_key_are_refused_naming_it(tmp_path: Path, valid_content: dict[str, Any]) -> None:
    weights = {k: v for k, v in valid_content["state_dict"].items() if k != "dense.1.bias"}
    message = refusal(written(tmp_path / "m.pt", break_content(valid_content, state_dict=weights)))
    assert "weights do not fit cnn4 with 3 classes: 1 missing keys (dense.1.bias)" in message


def test_weights_with_an_extra_key_are_refused_naming_it(
    tmp_path: Path, valid_content: dict[str, Any]
) -> None:
    weights = {**valid_content["state_dict"], "surprise.weight": torch.zeros(2)}
    message = refusal(written(tmp_path / "m.pt", break_content(valid_content, state_dict=weights)))
    assert "1 unexpected keys (surprise.weight)" in message


def test_weights_of_a_different_class_count_are_refused_naming_the_head(
    tmp_path: Path, valid_content: dict[str, Any]
) -> None:
    content = break_content(valid_content, labels=["BI-RADS 1", "BI-RADS 2"])
    message = refusal(written(tmp_path / "m.pt", content))
    assert (
        "weights do not fit cnn4 with 2 classes: 2 shape mismatches (head.weight (3, 256) != (2, 256)"
        in message
    )


def test_weights_of_another_architecture_are_refused(tmp_path: Path, valid_content: dict[str, Any]) -> None:
    weights = seeded_model("cnn_lstm").state_dict()
    content = break_content(valid_content, state_dict=weights)
    message = refusal(written(tmp_path / "m.pt", content))
    assert "weights do not fit cnn4 with 3 classes" in message
    assert "unexpected keys (lstm." in message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("nan"), "weight head.bias contains NaN or infinite values"),
        (float("inf"), "weight head.bias contains NaN or infinite values"),
    ],
)
def test_weights_that_are_not_finite_are_refused(
    tmp_path: Path, valid_content: dict[str, Any], value: float, reason: str
) -> None:
    weights = {**valid_content["state_dict"], "head.bias": torch.full((3,), value)}
    assert reason in refusal(written(tmp_path / "m.pt", break_content(valid_content, state_dict=weights)))


def test_integer_weights_where_floats_belong_are_refused(
    tmp_path: Path, valid_content: dict[str, Any]
) -> None:
    weights = {**valid_content["state_dict"], "head.bias": torch.zeros(3, dtype=torch.int64)}
    message = refusal(written(tmp_path / "m.pt", break_content(valid_content, state_dict=weights)))
    assert "weight head.bias has dtype torch.int64, expected torch.float32" in message


def test_a_loaded_bundle_is_frozen(tmp_path: Path) -> None:
    save_bundle(tmp_path / "m.pt", seeded_model(), architecture="cnn4", labels=LABELS, input_spec=SPEC)
    bundle: ModelBundle = load_bundle(tmp_path / "m.pt")
    with pytest.raises(AttributeError):
        bundle.labels = ("x",)  # type: ignore[misc]


def test_the_bundle_file_is_plain_data_that_loads_without_this_code(tmp_path: Path) -> None:
    """Another tool (or a later version) can read a bundle with torch alone."""
    save_bundle(tmp_path / "m.pt", seeded_model(), architecture="cnn4", labels=LABELS, input_spec=SPEC)
    content = torch.load(io.BytesIO((tmp_path / "m.pt").read_bytes()), weights_only=True)
    assert content["format"] == "precedent-model-bundle"
    assert content["labels"] == list(LABELS)
    assert content["input"] == {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
