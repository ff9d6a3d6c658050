"""``model.pretrained=hf:nvidia/mit-b0[@revision]``: the weights through huggingface_hub's cache.

Nothing here reaches the real hub. The cache is either laid out by hand exactly as
huggingface_hub lays it (``models--nvidia--mit-b0/{blobs,refs,snapshots}``, checked against the
library's own cache scanner and against a cache the library filled itself), or filled by the real
library downloading from ``FakeHub``, a local HTTP server that answers the hub's file requests
(``/<repo>/resolve/<revision>/<file>``) with the headers the library reads. The weights are a tiny
random mit_b0 renamed to the key layout of nvidia/mit-b0 by the inverse key map of
tests/test_models.py. huggingface_hub reads its environment (HF_HUB_CACHE, HF_HUB_OFFLINE,
HF_ENDPOINT) when imported; the ``hub`` fixture sets it and re-reads it, as a fresh process would.
"""

import hashlib
import http.server
import importlib
import os
import subprocess
import sys
import threading
from argparse import Namespace
from pathlib import Path
from unittest import mock
from urllib.parse import unquote

import pytest
import torch
from huggingface_hub import constants, file_download, scan_cache_dir
from huggingface_hub.file_download import repo_folder_name
from safetensors.torch import save as safetensors_bytes

from afa.models import AFANet, WeightsError, load_pretrained
from afa.models import mix_transformer as mit
from afa.models.weights import hub_weight_file
from conftest import DEMO_CONFIG, REPO, tiny_overrides
from test_models import _to_hf_names

REPO_ID = "nvidia/mit-b0"
COMMIT = hashlib.sha1(b"a commit of nvidia/mit-b0").hexdigest()  # 40 hex digits, as the hub's


def _hf_state(seed=0):
    """``(encoder state, the same weights as Hugging Face names them)`` of a random mit_b0."""
    torch.manual_seed(seed)
    state = dict(mit.mit_b0().state_dict())
    head = {"head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)}
    with_head = {**state, **head}  # the ImageNet classifier, as the hub's file holds it
    return state, {k: v.contiguous() for k, v in _to_hf_names(with_head).items()}


def _torch_bytes(obj, tmp_path) -> bytes:
    torch.save(obj, tmp_path / "bin.tmp")
    return (tmp_path / "bin.tmp").read_bytes()


def put_in_cache(cache: Path, files: dict, repo_id=REPO_ID, commit=COMMIT, ref="main") -> Path:
    """Lay ``files`` ({name: bytes}) out as huggingface_hub caches a download of ``repo_id`` at
    ``commit``: the bytes in blobs/<sha256> (the name of a large file's blob), a relative link
    snapshots/<commit>/<name> to it, and refs/<ref> holding the commit hash. Returns the repo's
    folder."""
    folder = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)  # no newline, as the library writes it
    return folder


def _layout(folder: Path) -> list:
    """Every path under a repo's cache folder with what it is: the shape of a cache, bytes aside."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out.append((rel, "->", os.readlink(p)))
        elif p.is_file():
            out.append((rel, p.read_text() if rel.startswith("refs/") else "file"))
    return out


class FakeHub:
    """A local HTTP server answering HEAD and GET ``/<repo>/resolve/<revision>/<file>`` the way
    huggingface.co does for a model repository: the commit in X-Repo-Commit, the SHA-256 as ETag
    (a large file's), 404 with X-Error-Code for a missing repository, revision or file. ``portal``
    makes it answer every request with a plain web page, as a captive portal or a misconfigured
    proxy does. ``requests`` records what was asked."""

    def __init__(self):
        self.repos = {}  # repo_id -> (commit, {name: bytes})
        self.portal = False
        self.requests = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body):
                hub.requests.append((self.command, self.path))
                status, headers, data = hub.answer(unquote(self.path.split("?")[0]))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args):  # no access log on the test's stderr
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def answer(self, path):
        if self.portal:
            return 200, {"Content-Type": "text/html"}, b"<html>Please log in</html>"
        parts = path.strip("/").split("/")
        repo_id, rest = "/".join(parts[:2]), parts[2:]
        if repo_id not in self.repos or len(rest) < 3 or rest[0] != "resolve":
            return 401, {"X-Error-Code": "RepoNotFound"}, b""
        commit, files = self.repos[repo_id]
        revision, name = rest[1], "/".join(rest[2:])
        if revision not in ("main", commit):
            return 404, {"X-Error-Code": "RevisionNotFound"}, b""
        if name not in files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b""
        data = files[name]
        return 200, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                     "Content-Type": "application/octet-stream"}, data

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture
def hub(tmp_path):
    """Configure huggingface_hub through its environment, as a user does, and re-read it:
    ``hub(offline=..., endpoint=...)`` returns the cache folder (empty, under tmp_path). Offline
    by default; the endpoint defaults to a closed port, so no test can reach the real hub."""
    cache = tmp_path / "hf_cache" / "hub"

    def reread():
        importlib.reload(constants)
        # Releases before 1.0 copy settings (the cache, the URL template holding HF_ENDPOINT)
        # from constants into file_download at import; later ones read constants at each call.
        for name in dir(file_download):
            if name.isupper() and hasattr(constants, name):
                setattr(file_download, name, getattr(constants, name))

    def configure(offline=True, endpoint="http://127.0.0.1:9"):
        os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1" if offline else "0",
                          HF_ENDPOINT=endpoint)
        reread()
        assert constants.HF_HUB_CACHE == str(cache) and constants.HF_HUB_OFFLINE == offline
        return cache

    with mock.patch.dict(os.environ):
        for key in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
            os.environ.pop(key, None)
        yield configure
    reread()  # the environment as it was


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------------------------
# The cache, offline
# --------------------------------------------------------------------------------------------


def test_hand_made_cache_is_one_the_library_recognises(tmp_path):
    _, hf = _hf_state()
    data = safetensors_bytes(hf)
    folder = put_in_cache(tmp_path / "hub", {"model.safetensors": data})
    (repo,) = scan_cache_dir(tmp_path / "hub").repos
    assert (repo.repo_id, repo.repo_type, repo.repo_path) == (REPO_ID, "model", folder)
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == frozenset({"main"})
    (file,) = revision.files
    assert file.file_name == "model.safetensors" and file.blob_path.read_bytes() == data


def test_hub_id_loads_from_the_cache_offline(hub):
    cache = hub(offline=True)
    state, hf = _hf_state()
    data = safetensors_bytes(hf)
    put_in_cache(cache, {"model.safetensors": data})
    model = AFANet("mit_b0", num_classes=4, pretrained="hf:nvidia/mit-b0")
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    info = model.pretrained_info
    sha = hashlib.sha256(data).hexdigest()[:12]
    assert info == (f"hf:{REPO_ID}@{COMMIT}", sha, "mit_b0")
    assert str(info) == f"mit_b0 weights from hf:{REPO_ID}@{COMMIT} (sha256 {sha})"


def test_revisions_and_the_pinned_record_load_the_same_file(hub):
    cache = hub(offline=True)
    state, hf = _hf_state()
    put_in_cache(cache, {"model.safetensors": safetensors_bytes(hf)}, ref="v1.0")
    (cache / repo_folder_name(repo_id=REPO_ID, repo_type="model") / "refs" / "main").write_text(
        COMMIT)
    infos = [load_pretrained(mit.mit_b0(), f"hf:{REPO_ID}{rev}", name="mit_b0")
             for rev in ("", "@main", "@v1.0", f"@{COMMIT}")]
    assert {i.path for i in infos} == {f"hf:{REPO_ID}@{COMMIT}"}
    encoder = mit.mit_b0()
    assert load_pretrained(encoder, infos[0].path, name="mit_b0") == infos[0]
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())
    with pytest.raises(FileNotFoundError) as err:
        load_pretrained(mit.mit_b0(), f"hf:{REPO_ID}@v2.0", name="mit_b0")
    assert f"{REPO_ID}@v2.0" in _one_line(err)


def test_safetensors_is_preferred_and_pytorch_model_bin_read_as_data(hub, tmp_path):
    cache = hub(offline=True)
    state, hf = _hf_state(seed=0)
    other_state, other_hf = _hf_state(seed=1)
    bin_data = _torch_bytes(other_hf, tmp_path)
    folder = put_in_cache(cache, {"pytorch_model.bin": bin_data})
    encoder = mit.mit_b0()
    info = load_pretrained(encoder, "hf:nvidia/mit-b0", name="mit_b0")
    assert info.sha256 == hashlib.sha256(bin_data).hexdigest()[:12]
    assert all(torch.equal(v, other_state[k]) for k, v in encoder.state_dict().items())

    put_in_cache(cache, {"model.safetensors": safetensors_bytes(hf)})  # beside the .bin
    encoder = mit.mit_b0()
    load_pretrained(encoder, "hf:nvidia/mit-b0", name="mit_b0")
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())

    # A pickle holding Python objects besides tensors is refused unexecuted, as a .pth file is.
    for link in (folder / "snapshots" / COMMIT).iterdir():
        link.unlink()
    put_in_cache(cache, {"pytorch_model.bin": _torch_bytes({"args": Namespace(lr=1)}, tmp_path)})
    with pytest.raises(WeightsError, match="Python objects besides tensors") as err:
        load_pretrained(mit.mit_b0(), "hf:nvidia/mit-b0", name="mit_b0")
    assert f"hf:{REPO_ID}@{COMMIT}" in _one_line(err)


def test_empty_cache_offline_is_one_line_naming_repo_cache_and_the_way_round(hub):
    cache = hub(offline=True)
    with pytest.raises(FileNotFoundError) as err:
        AFANet("mit_b0", num_classes=4, pretrained="hf:nvidia/mit-b0")
    message = _one_line(err)
    for part in (REPO_ID, str(cache), "HF_HUB_OFFLINE", "model.pretrained=/path/to/mit-b0",
                 "huggingface.co/nvidia/mit-b0"):
        assert part in message, part


def test_a_damaged_cached_file_is_named(hub):
    cache = hub(offline=True)
    _, hf = _hf_state()
    folder = put_in_cache(cache, {"model.safetensors": safetensors_bytes(hf)})
    (blob,) = (folder / "blobs").iterdir()
    blob.write_bytes(blob.read_bytes()[:-10])  # cut short after the download
    with pytest.raises(WeightsError, match="damaged download") as err:
        load_pretrained(mit.mit_b0(), "hf:nvidia/mit-b0", name="mit_b0")
    assert str(blob) in _one_line(err)


def test_another_variant_from_the_hub_names_the_right_id(hub):
    cache = hub(offline=True)
    _, hf = _hf_state()
    put_in_cache(cache, {"model.safetensors": safetensors_bytes(hf)})
    with pytest.raises(WeightsError) as err:
        load_pretrained(mit.mit_b1(), "hf:nvidia/mit-b0", name="mit_b1")
    assert _one_line(err) == (
        f"hf:{REPO_ID}@{COMMIT} holds mit_b0 weights, but model.backbone is mit_b1: set "
        "model.backbone=mit_b0 or model.pretrained=hf:nvidia/mit-b1")


@pytest.mark.parametrize("spec, message", [
    ("hf:", "no hub id"), ("hf:a/b/c", "no hub id"), ("hf:nvidia/mit b0", "no hub id"),
    ("hf:nvidia/mit-b0@", "empty revision"),
], ids=["empty", "three-parts", "space", "empty-revision"])
def test_malformed_hub_ids_are_refused(hub, spec, message):
    hub(offline=True)
    with pytest.raises(WeightsError, match=message) as err:
        hub_weight_file(spec)
    assert spec in _one_line(err)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def test_download_fills_the_cache_falls_back_to_the_bin_then_works_offline(hub, fake_hub,
                                                                          tmp_path):
    state, hf = _hf_state()
    bin_data = _torch_bytes(hf, tmp_path)
    fake_hub.repos[REPO_ID] = (COMMIT, {"pytorch_model.bin": bin_data, "config.json": b"{}"})
    cache = hub(offline=False, endpoint=fake_hub.url)
    info = load_pretrained(mit.mit_b0(), "hf:nvidia/mit-b0", name="mit_b0")
    assert info.path == f"hf:{REPO_ID}@{COMMIT}"
    assert info.sha256 == hashlib.sha256(bin_data).hexdigest()[:12]
    asked = {path.rsplit("/", 1)[1] for _, path in fake_hub.requests}
    assert asked == {"model.safetensors", "pytorch_model.bin"}  # safetensors first, then the bin

    # The library's own download has the layout put_in_cache makes (bar its note that this
    # commit has no model.safetensors).
    folder = cache / repo_folder_name(repo_id=REPO_ID, repo_type="model")
    hand_made = put_in_cache(tmp_path / "by_hand", {"pytorch_model.bin": bin_data})
    assert [e for e in _layout(folder) if not e[0].startswith(".no_exist")] == _layout(hand_made)

    # Now from the cache alone: offline, and with the server gone.
    fake_hub.close()
    for offline in (True, False):
        hub(offline=offline, endpoint=fake_hub.url)
        encoder = mit.mit_b0()
        assert load_pretrained(encoder, "hf:nvidia/mit-b0", name="mit_b0") == info
        assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())


def test_the_cache_is_asked_before_the_network(hub, fake_hub):
    _, hf = _hf_state()
    cache = hub(offline=False, endpoint=fake_hub.url)
    put_in_cache(cache, {"model.safetensors": safetensors_bytes(hf)})
    fake_hub.repos[REPO_ID] = (COMMIT, {"model.safetensors": b"not these"})
    info = load_pretrained(mit.mit_b0(), "hf:nvidia/mit-b0", name="mit_b0")
    assert info.path == f"hf:{REPO_ID}@{COMMIT}" and fake_hub.requests == []


def test_a_network_that_fails_without_the_cache_is_one_line(hub, fake_hub):
    # A web page in place of the hub (captive portal, wrong proxy): the library gives up at once,
    # where a refused connection is retried for about 25 s before the same error.
    fake_hub.portal = True
    cache = hub(offline=False, endpoint=fake_hub.url)
    with pytest.raises(FileNotFoundError) as err:
        load_pretrained(mit.mit_b0(), "hf:nvidia/mit-b0", name="mit_b0")
    message = _one_line(err)
    assert f"not in the Hugging Face cache {cache}" in message
    assert "the hub cannot be reached: FileMetadataError" in message
    assert "model.pretrained=/path/to/mit-b0" in message
    assert len(fake_hub.requests) == 1  # no second file asked of a hub that is not there


@pytest.mark.parametrize("spec, message", [
    ("hf:nvidia/mit-b9", "the Hugging Face hub has no repository nvidia/mit-b9"),
    ("hf:nvidia/mit-b0@v9", "nvidia/mit-b0 has no revision 'v9'"),
    ("hf:nvidia/config-only", "nvidia/config-only on the Hugging Face hub has neither "
                              "model.safetensors nor pytorch_model.bin"),
], ids=["repository", "revision", "weight-file"])
def test_what_the_hub_does_not_have_is_named(hub, fake_hub, spec, message):
    fake_hub.repos[REPO_ID] = (COMMIT, {"model.safetensors": b""})
    fake_hub.repos["nvidia/config-only"] = (COMMIT, {"config.json": b"{}"})
    hub(offline=False, endpoint=fake_hub.url)
    with pytest.raises(WeightsError) as err:
        load_pretrained(mit.mit_b0(), spec, name="mit_b0")
    assert message in _one_line(err)


# --------------------------------------------------------------------------------------------
# tools/train.py, configured through the environment in a process of its own
# --------------------------------------------------------------------------------------------


def _train(tiny_data, work_dir, env):
    overrides = tiny_overrides(tiny_data, work_dir, **{
        "model.pretrained": "hf:nvidia/mit-b0", "train.max_iters": 1, "train.eval_iters": 1,
        "train.ckpt_iters": 1, "train.aff_switch_iter": 1, "optim.warmup_iters": 1})
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    return subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "--config",
                           str(DEMO_CONFIG), *overrides], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**base, **env})


def test_train_tool_loads_hub_weights_from_the_cache_offline(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    _, hf = _hf_state()
    data = safetensors_bytes(hf)
    put_in_cache(cache, {"model.safetensors": data})
    proc = _train(tiny_data, tmp_path / "work", {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                                                 "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "work" / "train.log").read_text()
    sha = hashlib.sha256(data).hexdigest()[:12]
    assert f"Loaded mit_b0 weights from hf:{REPO_ID}@{COMMIT} (sha256 {sha})" in log


def test_train_tool_exits_2_when_neither_cache_nor_network_has_them(tiny_data, tmp_path):
    # HF_HOME alone places the cache at HF_HOME/hub, which the message names.
    home = tmp_path / "hf_home"
    proc = _train(tiny_data, tmp_path / "work", {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: model.pretrained=hf:nvidia/mit-b0: nvidia/mit-b0 ")
    assert f"not in the Hugging Face cache {home / 'hub'} and HF_HUB_OFFLINE is set" in line
    assert "Traceback" not in proc.stderr
