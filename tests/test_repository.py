"""The model repository: names and paths confined to the root, specs, formats, safe loading."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from common.errors import ConfigError, InvalidNameError, ModelLoadError, UnknownModelError
from loader.formats import load_module, module_bytes
from loader.repository import ModelRepository, version_sort_key
from loader.spec import check_name, check_version

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "a b", ".hidden", "x" * 65, None, 3])
def test_bad_model_names_are_refused(bad: object) -> None:
    with pytest.raises(InvalidNameError, match="invalid model name"):
        check_name(bad)


@pytest.mark.parametrize("bad", ["", "..", "1..2", "v1/../../x", "-v"])
def test_bad_versions_are_refused(bad: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid model version"):
        check_version(bad)


def test_versions_sort_naturally() -> None:
    assert sorted(["v10", "v2", "v1"], key=version_sort_key) == ["v1", "v2", "v10"]


def test_lookups_name_what_exists(test_repo: Path) -> None:
    repo = ModelRepository(test_repo)
    assert {"tiny_mlp", "small_cnn", "linear"} <= set(repo.list_models())
    assert repo.versions("linear") == ["v1", "v2"]
    assert repo.default_version("linear") == "v1"
    assert repo.default_version("tiny_mlp") == "v1"
    with pytest.raises(UnknownModelError, match=r"unknown model 'ghost'; .*linear"):
        repo.versions("ghost")
    with pytest.raises(UnknownModelError, match=r"no version 'v3'; versions: v1, v2"):
        repo.spec("linear", "v3")
    entry = repo.registry_entry("linear")
    assert entry["default_version"] == "v1"
    assert entry["versions"]["v2"]["input"] == {"dtype": "float32", "shape": [8]}


def test_symlinks_out_of_the_root_are_refused(tmp_path: Path, test_repo: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "v1").mkdir(parents=True)
    (outside / "v1" / "model.json").write_text((test_repo / "linear/v1/model.json").read_text())
    (test_repo / "escape").symlink_to(outside)
    (test_repo / "linear" / "v9").symlink_to(outside / "v1")
    repo = ModelRepository(test_repo)
    with pytest.raises(InvalidNameError, match="outside the model repository"):
        repo.spec("escape", "v1")
    with pytest.raises(InvalidNameError, match="outside the model repository"):
        repo.spec("linear", "v9")
    assert "escape" not in repo.list_models()
    assert repo.versions("linear") == ["v1", "v2"]


def test_a_bad_config_names_the_file_and_field(test_repo: Path) -> None:
    spec = test_repo / "linear" / "v2" / "model.json"
    spec.write_text(json.dumps({"format": "onnx", "input": {"shape": [8]}}))
    with pytest.raises(ConfigError, match=r"linear/v2/model.json.*format"):
        ModelRepository(test_repo).spec("linear", "v2")
    spec.write_text(json.dumps({"format": "state_dict", "input": {"shape": [8]}}))
    with pytest.raises(ConfigError, match="needs 'factory'"):
        ModelRepository(test_repo).spec("linear", "v2")


def test_each_format_loads_and_runs(test_repo: Path) -> None:
    repo = ModelRepository(test_repo)
    for name, rows in (("tiny_mlp", (64,)), ("small_cnn", (3, 64, 64)), ("linear", (8,))):
        spec = repo.spec(name, "v1")
        module = load_module(spec, repo.model_file(name, "v1", spec), torch.device("cpu"))
        assert module(torch.zeros(2, *rows)).shape[0] == 2
        assert module_bytes(module) > 0


def test_tiny_mlp_and_cnn_have_the_documented_shapes(test_repo: Path) -> None:
    repo = ModelRepository(test_repo)
    spec = repo.spec("tiny_mlp", "v1")
    mlp = load_module(spec, repo.model_file("tiny_mlp", "v1", spec), torch.device("cpu"))
    # 64*256+256 + 256*256+256 + 256*10+10 float32 parameters
    assert module_bytes(mlp) == 4 * (64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10)


class _Exploit:
    def __reduce__(self) -> tuple[object, ...]:
        return (print, ("executed",))


def test_state_dicts_load_weights_only(test_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = test_repo / "linear" / "v1" / "model.pt"
    torch.save({"fc.weight": torch.zeros(4, 8), "fc.bias": _Exploit()}, path)
    repo = ModelRepository(test_repo)
    spec = repo.spec("linear", "v1")
    with pytest.raises(ModelLoadError, match=r"cannot load model\.pt"):
        load_module(spec, path, torch.device("cpu"))
    assert "executed" not in capsys.readouterr().out


def test_export_archives_with_pickled_payloads_are_refused(test_repo: Path) -> None:
    path = test_repo / "small_cnn" / "v1" / "model.pt2"
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    name = next(n for n in members if n.endswith("weights/model_weights_config.json"))
    config = json.loads(members[name])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    members[name] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    repo = ModelRepository(test_repo)
    with pytest.raises(ModelLoadError, match="pickled object"):
        load_module(repo.spec("small_cnn", "v1"), path, torch.device("cpu"))


def test_a_garbage_file_is_a_load_error(test_repo: Path) -> None:
    repo = ModelRepository(test_repo)
    for name, file in (("tiny_mlp", "model.pt"), ("small_cnn", "model.pt2")):
        path = test_repo / name / "v1" / file
        path.write_bytes(pickle.dumps("not a model"))
        with pytest.raises(ModelLoadError):
            load_module(repo.spec(name, "v1"), path, torch.device("cpu"))


def test_formats_lists_every_readable_versions_format(test_repo: Path) -> None:
    from loader.spec import ModelFormat

    formats = ModelRepository(test_repo).formats()
    assert ModelFormat.STATE_DICT in formats
    (test_repo / "linear" / "v9").mkdir()
    (test_repo / "linear" / "v9" / "model.json").write_text("not json")
    assert ModelRepository(test_repo).formats() == formats  # an unreadable spec is left out


def test_the_export_warm_up_imports_what_a_first_load_needs() -> None:
    import subprocess
    import sys

    # A fresh interpreter: this one may have loaded an exported model already.
    code = (
        "import sys; from loader.formats import prewarm; from loader.spec import ModelFormat;"
        "prewarm({ModelFormat.EXPORT}); print('torch._export.serde.serialize' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
