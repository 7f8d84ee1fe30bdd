"""`python -m sonic_rt download`: the real huggingface_hub client against a local imitation of the hub
(tests/scripts/fake_hub.py) serving the demo checkpoint in the official layout, plus the other files the real
repositories hold (which must never be fetched)."""

from __future__ import annotations

import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_wav

from sonic_rt import download as dl
from sonic_rt.checkpoint import DEMO_MARKER, SVD_DIR, WHISPER_DIR
from sonic_rt.cli import build_parser, main

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from fake_hub import FakeHub, Repo, files_under  # noqa: E402
from opened_files import OpenedFiles  # noqa: E402

README = Path(__file__).parents[1] / "README.md"
GRANTED = "hf_granted_token"
COMMITS = {dl.SONIC_REPO: "1" * 40, dl.SVD_REPO: "2" * 40, dl.WHISPER_REPO: "3" * 40}
YOLO = "yoloface_v5m.pt"
VAE_FP16 = "vae/diffusion_pytorch_model.fp16.safetensors"

# Files the real repositories hold besides those the runtime reads (stand-in contents: junk the loader would reject).
DECOYS = {
    "": ["README.md", ".gitattributes"],
    SVD_DIR: [
        "svd_xt.safetensors",
        "svd_xt_image_decoder.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "image_encoder/model.safetensors",
        "model_index.json",
        "LICENSE.md",
        "README.md",
    ],
    WHISPER_DIR: [
        "pytorch_model.bin",
        "tf_model.h5",
        "flax_model.msgpack",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "normalizer.json",
        "added_tokens.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "README.md",
    ],
}


class CentreFace(torch.nn.Module):
    """Stands in for yoloface_v5m.pt (official contract: ``model(img, grids) -> [1, N, 16]``): one face in the
    middle of the image, 40% of its width and half its height, confidence 0.81. Its unused ``padding`` makes the
    file 12 MiB, larger than huggingface_hub's download chunk (10 MiB), the unit in which a dropped download
    resumes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("padding", torch.zeros(3 * 1024 * 1024))

    def forward(self, img: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        h = float(img.size(2))
        w = float(img.size(3))
        pred = torch.zeros(1, 1, 16)
        pred[0, 0, 0] = w / 2
        pred[0, 0, 1] = h / 2
        pred[0, 0, 2] = 0.4 * w
        pred[0, 0, 3] = 0.5 * h
        pred[0, 0, 4] = 0.9
        pred[0, 0, 15] = 0.9
        return pred


@pytest.fixture(scope="module")
def hub_tree(demo_dir, tmp_path_factory) -> Path:
    """What a download of the three whole repositories would give: the demo checkpoint (without sonic_rt's demo
    marker, which no hub repository has), a YOLO stand-in and the decoys."""
    tree = tmp_path_factory.mktemp("hub") / "full"
    shutil.copytree(demo_dir, tree)
    (tree / DEMO_MARKER).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
        torch.jit.script(CentreFace()).save(str(tree / "yoloface_v5m.pt"))
    for subdir, names in DECOYS.items():
        for name in names:
            path = tree / subdir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not read by the runtime: " + name.encode())
    return tree


def repos_of(tree: Path) -> list[Repo]:
    nested = (SVD_DIR, WHISPER_DIR)
    sonic = {k: v for k, v in files_under(tree).items() if not k.startswith(tuple(f"{d}/" for d in nested))}
    return [
        Repo(dl.SONIC_REPO, sonic, COMMITS[dl.SONIC_REPO]),
        Repo(dl.SVD_REPO, files_under(tree / SVD_DIR), COMMITS[dl.SVD_REPO], allowed_tokens={GRANTED}),
        Repo(dl.WHISPER_REPO, files_under(tree / WHISPER_DIR), COMMITS[dl.WHISPER_REPO]),
    ]


@pytest.fixture(scope="module")
def hub(hub_tree):
    with FakeHub(repos_of(hub_tree)) as server:
        yield server


@pytest.fixture(autouse=True)
def no_stored_token(monkeypatch, tmp_path):
    """No token but what a test gives (neither the environment's nor a `hf auth login` file)."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))


def repo_path(rel: str) -> str:
    """``repo_id/path in repo`` of a path of the model directory (how the fake hub logs files)."""
    for group in dl.MANIFEST:
        if group.subdir and rel.startswith(group.subdir + "/"):
            return f"{group.repo_id}/{rel[len(group.subdir) + 1 :]}"
    return f"{dl.SONIC_REPO}/{rel}"


def model_files(root: Path) -> list[str]:
    """Files of a model directory, huggingface_hub's .cache folders left out."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["download", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------------------------


def test_the_download_list_is_the_official_layout_of_what_the_loader_reads():
    assert dl.manifest_paths() == [
        "Sonic/unet.pth",
        "Sonic/audio2token.pth",
        "Sonic/audio2bucket.pth",
        "RIFE/flownet.pkl",
        "yoloface_v5m.pt",
        f"{SVD_DIR}/unet/config.json",
        f"{SVD_DIR}/vae/config.json",
        f"{SVD_DIR}/{VAE_FP16}",
        f"{SVD_DIR}/image_encoder/config.json",
        f"{SVD_DIR}/image_encoder/model.fp16.safetensors",
        f"{SVD_DIR}/scheduler/scheduler_config.json",
        f"{WHISPER_DIR}/config.json",
        f"{WHISPER_DIR}/model.safetensors",
        f"{WHISPER_DIR}/preprocessor_config.json",
    ]
    assert dl.parse_revisions(["v2", f"{dl.WHISPER_REPO}=abc"]) == {
        dl.SONIC_REPO: "v2",
        dl.SVD_REPO: "main",
        dl.WHISPER_REPO: "abc",
    }
    with pytest.raises(dl.DownloadError, match="unknown repository"):
        dl.parse_revisions(["someone/else=main"])


def test_the_readme_quick_start_is_what_the_command_does_and_prints():
    text = README.read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "sonic_rt download" in b)
    commands = [line.split("  #")[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 3 and '".[gpu]"' in commands[0]
    assert commands[1] == "python -m sonic_rt download"
    args = build_parser().parse_args(commands[1].split()[3:])
    assert (args.command, args.dir, args.token, args.revision, args.mirror, args.convert) == (
        "download",
        dl.DEFAULT_DIR,
        None,
        None,
        None,
        False,
    )
    assert commands[2] == dl.next_command(dl.DEFAULT_DIR)


def test_a_full_download_fetches_each_needed_file_once_and_nothing_else(hub, hub_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the hub's own variable, and its token variable
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    since = len(hub.log)
    root = tmp_path / "checkpoints"
    code, out, err = cli(capsys, root)
    assert code == 0, err
    assert model_files(root) == sorted(dl.manifest_paths())
    for rel in dl.manifest_paths():
        assert (root / rel).read_bytes() == (hub_tree / rel).read_bytes()
    log = hub.log[since:]
    fetched = sorted(r.path for r in hub.downloads(since))
    assert fetched == sorted(map(repo_path, dl.manifest_paths()))  # each once
    decoys = {repo_path(f"{d}/{n}" if d else n) for d, names in DECOYS.items() for n in names}
    assert not decoys & {r.path for r in log}  # not even asked about
    resolves = [r for r in log if r.revision is not None]
    assert {r.revision for r in resolves} == set(COMMITS.values())  # pinned: never "main"
    assert all(r.revision == COMMITS[repo] for r in resolves for repo in COMMITS if r.path.startswith(repo + "/"))
    assert all(r.authorization == f"Bearer {GRANTED}" for r in log if r.server == "hub")
    assert all(r.authorization is None for r in log if r.server == "cdn")  # the token stays on the hub
    assert out.strip().splitlines()[-1] == dl.next_command(str(root))

    # A second run finds everything there: nothing is fetched again, the check passes.
    since = len(hub.log)
    code, out, err = cli(capsys, root)
    assert code == 0, err
    assert hub.downloads(since) == [] and "14 already there" in out


def test_a_dropped_connection_is_resumed_with_a_range_request_and_a_rerun_fetches_no_finished_file(
    hub, hub_tree, tmp_path, capsys
):
    root = tmp_path / "ckpt"
    from huggingface_hub import constants

    yolo, vae = f"{dl.SONIC_REPO}/{YOLO}", f"{dl.SVD_REPO}/{VAE_FP16}"
    chunk = constants.DOWNLOAD_CHUNK_SIZE  # 10 MiB: the client keeps what it received in whole chunks
    hub.cut_once[yolo] = chunk + 1_000_000  # the connection drops 11 MB into the 12 MiB YOLO file
    hub.fail_once[vae] = 500  # and the hub fails on the SVD VAE: the run stops there
    args = (root, "--mirror", hub.url, "--token", GRANTED, "--revision", COMMITS[dl.SONIC_REPO])
    since = len(hub.log)
    code, out, err = cli(capsys, *args)
    assert code == 2
    assert error_lines(err) == [
        f"error: {dl.SVD_REPO}: {VAE_FP16}: the hub answered HTTP 500 (injected failure); run the same command "
        "again to continue"
    ]
    first = hub.downloads(since)
    yolo_gets = [(r.range, r.status) for r in first if r.path == yolo]
    assert yolo_gets == [(None, 200), (f"bytes={chunk}-", 206)]  # resumed, not restarted
    done = [rel for rel in dl.manifest_paths() if (root / rel).is_file()]
    assert done == dl.manifest_paths()[:7]  # Sonic's five, SVD's two configs; the VAE and after: not there
    for rel in done:
        assert (root / rel).read_bytes() == (hub_tree / rel).read_bytes()  # nothing half-written
    assert not list(root.rglob("*.incomplete"))

    # What a killed run leaves behind (huggingface_hub never reuses it): removed by the next run.
    orphan = root / SVD_DIR / ".cache/huggingface/download/vae/deadbeef.0123abcd.incomplete"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"\0" * 4096)
    since = len(hub.log)
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert sorted(r.path for r in hub.downloads(since)) == sorted(repo_path(rel) for rel in dl.manifest_paths()[7:])
    assert not orphan.exists() and "removed 1 partial download" in out
    assert model_files(root) == sorted(dl.manifest_paths())


def test_a_gated_repository_fails_in_one_line_that_says_where_to_accept_the_licence(hub, tmp_path, capsys):
    root = tmp_path / "ckpt"
    hint = (
        f"accept its licence at https://huggingface.co/{dl.SVD_REPO} while logged in, then pass that account's "
        "token (--token, HF_TOKEN or `hf auth login`)"
    )
    code, _, err = cli(capsys, root, "--mirror", hub.url)  # the hub answers 401 GatedRepo
    assert code == 2
    assert err.strip().splitlines() == [f"error: {dl.SVD_REPO}: gated repository (no token was sent): {hint}"]
    code, _, err = cli(capsys, root, "--mirror", hub.url, "--token", "hf_not_granted")  # 403 GatedRepo
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {dl.SVD_REPO}: gated repository (this token's account has not been granted access): {hint}"
    ]
    assert not root.exists()  # refused before anything was written


def test_too_little_disk_space_is_refused_before_anything_is_written(hub, hub_tree, tmp_path, capsys, monkeypatch):
    needed = sum((hub_tree / rel).stat().st_size for rel in dl.manifest_paths())
    monkeypatch.setattr(dl, "free_disk_bytes", lambda path: needed - 1)
    root = tmp_path / "ckpt"
    since = len(hub.log)
    code, _, err = cli(capsys, root, "--mirror", hub.url, "--token", GRANTED)
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {root}: not enough free disk space: the download needs {needed:,} bytes ({needed / 1e6:.1f} MB), "
        f"{needed - 1:,} bytes ({(needed - 1) / 1e6:.1f} MB) are free there"
    ]
    assert not root.exists() and hub.downloads(since) == []


def test_an_unknown_revision_or_repository_is_one_line_and_writes_nothing(hub, tmp_path, capsys):
    root = tmp_path / "ckpt"
    code, _, err = cli(capsys, root, "--mirror", hub.url, "--revision", "no-such-tag")
    assert (code, error_lines(err)) == (2, [f"error: {dl.SONIC_REPO}: revision no-such-tag not found on {hub.url}"])
    code, _, err = cli(capsys, root, "--mirror", hub.url, "--revision", "someone/else=main")
    assert code == 2 and error_lines(err)[0].startswith("error: --revision someone/else=main: unknown repository")
    assert not root.exists()


def test_convert_rewrites_the_pickles_after_the_download_and_the_check_loads_them(hub, tmp_path, capsys):
    root = tmp_path / "ckpt"
    code, out, err = cli(capsys, root, "--mirror", hub.url, "--token", GRANTED, "--convert")
    assert code == 0, err
    for rel in ("Sonic/unet", "Sonic/audio2token", "Sonic/audio2bucket", "RIFE/flownet"):
        assert f"wrote {root / rel}.safetensors" in out
    assert out.strip().splitlines()[-1] == dl.next_command(str(root))


def test_a_downloaded_directory_animates_and_the_runtime_opens_exactly_the_downloaded_files(
    hub, hub_tree, portrait, tmp_path
):
    import sonic_rt

    root = tmp_path / "ckpt"
    line = dl.run(str(root), mirror=hub.url, token=GRANTED, log=lambda _: None)
    assert line == dl.next_command(str(root))
    audio = write_wav(
        tmp_path / "tone.wav", (0.3 * np.sin(np.linspace(0, 2 * np.pi * 220 * 0.64, 10240, False))).astype(np.float32)
    )
    with OpenedFiles(root) as opened:
        rt = sonic_rt.Runtime(root)
        res = rt.animate(portrait, audio, tmp_path / "out.mp4", steps=1, min_resolution=64, progress=False)
    # 0.64 s at 16 kHz: 16 frames at 25 fps -> 8 generated -> 15 after RIFE; the YOLO stand-in found the face.
    assert (res.num_generated_frames, res.num_frames, res.width, res.height) == (8, 15, 64, 64)
    assert res.reference.detector == "yolo" and (tmp_path / "out.mp4").is_file()
    assert {p for p in opened.paths if ".cache" not in p} == set(dl.manifest_paths())

    # On a directory holding the whole repositories, the runtime opens nothing the download leaves out.
    with OpenedFiles(hub_tree) as opened:
        sonic_rt.Runtime(hub_tree)
    assert opened.paths == set(dl.manifest_paths())
