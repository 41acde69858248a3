"""Sharing models on the Hugging Face Hub, all offline: ``snapshot_download`` and ``HfApi`` are replaced by fakes
that read from and write to local folders, and raise huggingface_hub's own exceptions for network failures."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub.utils import (  # noqa: E402
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from vgskit.errors import ConfigError, VGSKitError  # noqa: E402
from vgskit.hub import (  # noqa: E402
    HUB_FILES,
    HubModelError,
    is_hub_id,
    push_to_hub,
    split_hub_id,
    write_model_card,
)
from vgskit.models.registry import create_model, load_pretrained, save_pretrained  # noqa: E402

RESULTS = {
    "speech_to_image": {"R@1": 12.34, "R@5": 34.5, "R@10": 56.7, "median_rank": 9.0, "n_queries": 500,
                        "n_gallery": 100},
    "image_to_speech": {"R@1": 9.8, "R@5": 27.6, "R@10": 43.21, "median_rank": 14.0, "n_queries": 100,
                        "n_gallery": 500},
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("dual_encoder_tiny").eval()


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """No offline switch set unless a test sets one; any real download attempt fails the test."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected snapshot_download({args}, {kwargs})")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class FakeHub:
    """``snapshot_download`` over a local folder of repositories (``root/owner/name``), recording each call."""

    def __init__(self, root: Path, cache: Path):
        self.root, self.cache, self.calls = root, cache, []

    def __call__(self, repo_id: str, **kwargs: object) -> str:
        self.calls.append({"repo_id": repo_id, **kwargs})
        source = self.root / repo_id
        if not source.is_dir():
            raise _http_error(RepositoryNotFoundError, f"404 Client Error. Repository Not Found for url: "
                                                       f"https://huggingface.co/api/models/{repo_id}")
        target = self.cache / repo_id.replace("/", "--") / str(kwargs.get("revision") or "main")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for pattern in kwargs["allow_patterns"]:
            if (source / pattern).is_file():
                shutil.copy(source / pattern, target / pattern)
        return str(target)


def _http_error(cls: type[Exception], message: str) -> Exception:
    """An instance of one of huggingface_hub's HTTP errors, built with the response type its version expects."""
    for name in ("httpx2", "httpx"):
        try:
            http = importlib.import_module(name)
            response = http.Response(404, request=http.Request("GET", "https://huggingface.co/api/models/x/y"))
            return cls(message, response=response)
        except Exception:  # noqa: BLE001, S112 - try the next client library
            continue
    import requests

    response = requests.Response()
    response.status_code = 404
    return cls(message, response=response)


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module) -> FakeHub:
    """A fake hub holding ``me/tiny`` (the tiny model with its card) and ``me/not-a-model`` (a card only)."""
    repo = save_pretrained(model, tmp_path / "hub" / "me" / "tiny")
    write_model_card(repo, repo_id="me/tiny", results=RESULTS)
    other = tmp_path / "hub" / "me" / "not-a-model"
    other.mkdir(parents=True)
    (other / "README.md").write_text("# not a model\n")
    fake = FakeHub(tmp_path / "hub", tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def test_local_folder_loads_as_before_without_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          model: torch.nn.Module) -> None:
    folder = save_pretrained(model, tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    for given in (folder, str(folder)):
        loaded = load_pretrained(given)
        assert same_weights(loaded, model) and not loaded.training
    # A relative folder spelled like a hub id is local when it exists.
    monkeypatch.chdir(tmp_path)
    save_pretrained(model, Path("me") / "model")
    assert split_hub_id("me/model") is None
    assert same_weights(load_pretrained("me/model"), model)
    with pytest.raises(ConfigError, match="revision"):
        load_pretrained("me/model", revision="v1")


@pytest.mark.parametrize("name", ["./me/model", "/me/model", "~/me/model", "runs/me/model", "me\\model",
                                  "../model", "model"])
def test_path_like_strings_are_never_hub_ids(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert split_hub_id(name) is None and not is_hub_id(name)
    with pytest.raises(ConfigError, match="no config.json"):  # the autouse fake fails the test if called
        load_pretrained(name)


def test_path_objects_are_never_hub_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert split_hub_id(Path("me/model")) is None
    with pytest.raises(ConfigError, match="no config.json"):
        load_pretrained(Path("me/model"))


def test_hub_id_forms() -> None:
    assert split_hub_id("me/tiny") == ("me/tiny", None)
    assert split_hub_id("me/tiny@v1.0") == ("me/tiny", "v1.0")
    assert split_hub_id("Org-1/model_v2.small") == ("Org-1/model_v2.small", None)
    for name in ("me/", "/tiny", "me/ti ny", "me/tiny@", "me/tiny.", "me/a..b", ""):
        assert split_hub_id(name) is None, name


def test_hub_id_is_downloaded_then_loaded(hub: FakeHub, model: torch.nn.Module) -> None:
    loaded = load_pretrained("me/tiny", revision="v1")
    assert same_weights(loaded, model) and not loaded.training
    assert hub.calls == [{"repo_id": "me/tiny", "revision": "v1",
                          "allow_patterns": ["config.json", "model.safetensors", "README.md"],
                          "local_files_only": False}]
    load_pretrained("me/tiny@v2")
    assert hub.calls[-1]["revision"] == "v2"
    load_pretrained("me/tiny")
    assert hub.calls[-1]["revision"] is None
    with pytest.raises(ConfigError, match="pins revision"):
        load_pretrained("me/tiny@v2", revision="v3")


def test_commands_take_a_hub_id_as_checkpoint(hub: FakeHub, model: torch.nn.Module) -> None:
    # vgskit eval/search/index/serve --checkpoint go through load_model.
    from vgskit.experiment import load_model

    assert same_weights(load_model("me/tiny@v1"), model)
    assert hub.calls[-1]["repo_id"] == "me/tiny" and hub.calls[-1]["revision"] == "v1"


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_switches_restrict_to_the_cache(var: str, hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                                model: torch.nn.Module) -> None:
    monkeypatch.setenv(var, "1")
    assert same_weights(load_pretrained("me/tiny"), model)
    assert hub.calls[-1]["local_files_only"] is True
    # An explicit argument wins over the switches, both ways.
    load_pretrained("me/tiny", local_files_only=False)
    assert hub.calls[-1]["local_files_only"] is False
    monkeypatch.delenv(var)
    load_pretrained("me/tiny", local_files_only=True)
    assert hub.calls[-1]["local_files_only"] is True


def test_unknown_repository_names_it_and_says_how_to_get_it(hub: FakeHub) -> None:
    with pytest.raises(HubModelError) as info:
        load_pretrained("me/missing")
    message = str(info.value)
    assert isinstance(info.value, VGSKitError)
    assert "'me/missing'" in message and "not found on the Hugging Face Hub" in message
    assert "hf download me/missing" in message and "--local-dir" in message
    assert "Traceback" not in message and "https://" not in message


@pytest.mark.parametrize(("error", "offline", "expected"), [
    (lambda: LocalEntryNotFoundError("Cannot find the requested files in the disk cache"), True,
     "not in the local Hugging Face cache and offline mode is on"),
    (lambda: LocalEntryNotFoundError("Connection error, and the file is not in the cache"), False,
     "not in the local Hugging Face cache and the Hugging Face Hub cannot be reached"),
    (lambda: _http_error(RevisionNotFoundError, "404 Client Error. Revision Not Found"), False,
     "no such revision"),
    (lambda: ConnectionError("Failed to establish a new connection"), False, "cannot be downloaded"),
])
def test_network_failures_name_the_repository(error, offline: bool, expected: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(repo_id: str, **kwargs: object) -> str:
        assert kwargs["local_files_only"] is offline
        raise error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubModelError) as info:
        load_pretrained("me/tiny@v9")
    message = str(info.value)
    assert "model repository 'me/tiny' (revision 'v9')" in message and expected in message
    assert "hf download me/tiny --revision v9" in message


def test_repository_without_model_files(hub: FakeHub) -> None:
    with pytest.raises(HubModelError, match=r"'me/not-a-model' has no config.json and no model.safetensors"):
        load_pretrained("me/not-a-model")


class FakeApi:
    """``HfApi`` recording repository creation and copying each uploaded folder (removed after the upload)."""

    instances: list[FakeApi] = []

    def __init__(self, token: str | None = None, **kwargs: object):
        self.token, self.created, self.uploads = token, [], []
        FakeApi.instances.append(self)

    def create_repo(self, repo_id: str, **kwargs: object) -> str:
        self.created.append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs: object) -> str:
        copy = Path(self.copy_root) / f"upload{len(self.uploads)}"
        shutil.copytree(folder_path, copy)
        self.uploads.append({"repo_id": repo_id, "folder": copy, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/0123"


@pytest.fixture()
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> type[FakeApi]:
    FakeApi.instances = []
    FakeApi.copy_root = str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_push_to_hub_uploads_model_and_card(api: type[FakeApi], model: torch.nn.Module) -> None:
    out = push_to_hub(model, "me/tiny", results=RESULTS, recipe="demo", training_data="spoken-scenes (demo preset)",
                      private=True, token="hf_test", commit_message="first upload")
    assert out == "https://huggingface.co/me/tiny/commit/0123"
    (client,) = api.instances
    assert client.token == "hf_test"
    assert client.created == [{"repo_id": "me/tiny", "private": True, "exist_ok": True, "repo_type": "model"}]
    (upload,) = client.uploads
    assert upload["repo_id"] == "me/tiny" and upload["commit_message"] == "first upload"
    folder = upload["folder"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(HUB_FILES)

    card = (folder / "README.md").read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["library_name"] == "vgskit"
    assert {"vgskit", "dual-encoder", "dual-encoder-tiny"} <= set(meta["tags"])
    assert "# me/tiny" in card and "`dual_encoder_tiny` (family `dual_encoder`, class `DualEncoder`)" in card
    assert "**Recipe:** `demo`" in card and "**Training data:** spoken-scenes (demo preset)" in card
    assert "| direction | R@1 | R@5 | R@10 | queries | gallery |" in card
    assert "| speech to image | 12.3 | 34.5 | 56.7 | 500 | 100 images |" in card
    assert "| image to speech | 9.8 | 27.6 | 43.2 | 100 | 500 spoken captions |" in card
    assert 'load_pretrained("me/tiny")' in card and "Warning" not in card

    assert json.loads((folder / "config.json").read_text())["model"] == "dual_encoder_tiny"
    loaded = load_pretrained(folder)
    assert same_weights(loaded, model)


def test_model_card_results_forms(tmp_path: Path, model: torch.nn.Module) -> None:
    folder = save_pretrained(model, tmp_path / "m")
    # `vgskit eval --corpus` writes one result per split.
    per_split = {"test_seen": RESULTS, "test_unseen": {"speech_to_image": {
        "R@1": 1.5, "R@5": 6.25, "R@10": 11.0, "n_queries": 8, "n_gallery": 8}}}
    card = write_model_card(folder, results=per_split).read_text(encoding="utf-8")
    assert "**test_seen**" in card and "**test_unseen**" in card and "| 1.5 | 6.2 | 11.0 | 8 | 8 images |" in card
    assert "Warning: speech to image: the gallery holds only 8 images, so R@10 read 100 for any ranking." in card
    assert 'load_pretrained("path/to/this/folder")' in card and "# dual_encoder_tiny" in card
    # The results.json of `vgskit demo`, given by path.
    demo = tmp_path / "results.json"
    demo.write_text(json.dumps({"title": "demo", "results": RESULTS, "ceiling": None, "info": {}}))
    card = write_model_card(folder, repo_id="me/tiny", results=demo).read_text(encoding="utf-8")
    assert "| speech to image | 12.3 | 34.5 | 56.7 | 500 | 100 images |" in card
    # No results: no table.
    card = write_model_card(folder).read_text(encoding="utf-8")
    assert "## Results" not in card and front_matter(card)["library_name"] == "vgskit"
    assert sorted(p.name for p in folder.iterdir()) == sorted(HUB_FILES)


def test_push_to_hub_checks_before_uploading(api: type[FakeApi], model: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="no recall found"):
        push_to_hub(model, "me/tiny", results={"loss": 0.3})
    for bad in ("me/tiny@v1", "./me/tiny", "a/b/c", "tiny"):
        with pytest.raises(ConfigError, match="owner/name"):
            push_to_hub(model, bad)
    assert api.instances == []
