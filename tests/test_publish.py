"""Publishing to a Hub API server on 127.0.0.1 (tests/hub_server.py), through the real `huggingface_hub` client.

Publishes run `quantkit push` in a subprocess with ``HF_ENDPOINT`` pointing at the fake Hub: the client reads its
settings at import time, so a fresh process is the honest end-to-end check. Files are read back with
`hf_hub_download` (in this process, with the client's constants pointed at the fake Hub).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hub_server import READ_TOKEN, USER, WRITE_TOKEN, FakeHub
from huggingface_hub import ModelCard
from test_card import HUB_ID, MODEL, build_workspace, front_matter

from quantkit.errors import QuantkitError
from quantkit.publish import COMMIT_TRIES, MAX_FILE_SIZE, layout, plan_publish, scrub
from quantkit.workspace import Workspace

GGUF_REPO = f"{USER}/{MODEL}-GGUF"
SECRET = "hf_quantkitVerySecretToken9f8e7d6c5b4a3210"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub.running(tokens={WRITE_TOKEN: (USER, "write"), READ_TOKEN: (USER, "read"),
                                 SECRET: (USER, "write")}) as server:
        yield server


@pytest.fixture
def download(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., bytes]:
    """Fetch a file from the fake Hub with `hf_hub_download`."""
    from huggingface_hub import constants, hf_hub_download

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import time
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent-harnesses.json"))

    def fetch(repo: str, path: str, revision: str = "main") -> bytes:
        local = hf_hub_download(repo, path, revision=revision, endpoint=hub.url, token=WRITE_TOKEN,
                                cache_dir=tmp_path / "hf-cache")
        return Path(local).read_bytes()

    return fetch


def push(hub: FakeHub, target: Path, *args: str, token: str | None = WRITE_TOKEN,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`quantkit push TARGET ARGS` in a fresh process talking to the fake Hub."""
    full = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "QUANTKIT_DEBUG")}
    full |= {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "NO_COLOR": "1",
             "COLUMNS": "200", **(env or {})}
    if token:
        full["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "quantkit.cli.app", "push", str(target), *args],
                          capture_output=True, text=True, env=full, timeout=300)


def local_files(ws: Workspace, fmt: str) -> dict[str, Path]:
    """path in repo → local file, for every artifact that passed the gate, plus shared files."""
    out: dict[str, Path] = {}
    for entry in ws.artifacts.values():
        if entry["format"] != fmt or entry.get("gate", {}).get("passed") is False:
            continue
        for rel in entry["files"]:
            out[Path(rel).name] = ws.abs(rel)
    return out


def error_line(run: subprocess.CompletedProcess[str]) -> str:
    """The one error message (after any warnings), unwrapped."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    assert first is not None, run.stderr
    assert not any(line.startswith(("error:", "warning:", "Traceback")) for line in lines[first + 1:]), run.stderr
    return " ".join(lines[first:])  # rich may wrap the one message over lines


# -- the happy path ---------------------------------------------------------------------------------------------------
def test_publish_creates_the_repo_and_every_file_arrives(tmp_path: Path, hub: FakeHub,
                                                         download: Callable[..., bytes]) -> None:
    ws = build_workspace(tmp_path / "ws")
    run = push(hub, ws.root / "gguf", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["repo"] == GGUF_REPO and result["branches"] == ["main"]
    assert GGUF_REPO in hub.repos and not hub.repos[GGUF_REPO].private

    expected = local_files(ws, "gguf") | {f"{MODEL}-imatrix.gguf": ws.root / "gguf" / "imatrix.gguf",
                                          "README.md": ws.root / "gguf" / "README.md",
                                          "quality.csv": ws.root / "gguf" / "quality.csv"}
    assert set(hub.files(GGUF_REPO)) == {*expected, ".gitattributes"}
    assert {f["path"] for f in result["files"]} == set(expected)
    for name, local in expected.items():
        assert download(GGUF_REPO, name) == local.read_bytes(), name

    # the measurements as CSV: one row per published file, as the manifest has them
    import csv

    table = list(csv.DictReader(download(GGUF_REPO, "quality.csv").decode().splitlines()))
    published = {Path(k).name: e for k, e in ws.artifacts.items() if e["format"] == "gguf"
                 and e.get("gate", {}).get("passed") is not False}
    assert {r["file"] for r in table} == set(published) and all(r["gate"] == "passed" for r in table)
    for r in table:
        entry = published[r["file"]]
        assert int(r["size_bytes"]) == entry["size"] and float(r["kld_mean"]) == entry["eval"]["kld_mean"]

    # the gate-failed Q2_K stayed home, and is said so
    assert [r["quant"] for r in result["refused"]] == ["Q2_K"]
    assert "Q2_K" in run.stderr and "quality gate" in run.stderr

    # the card read back parses and carries the metadata
    card_path = tmp_path / "README.md"
    card_path.write_bytes(download(GGUF_REPO, "README.md"))
    card = ModelCard.load(card_path)
    assert card.data.base_model == HUB_ID
    assert card.data.get("base_model_relation") == "quantized"
    assert card.data.get("quantized_by") == "quantkit"
    assert card.data.language == ["ru"] and card.data.license == "apache-2.0"
    assert card.data.library_name == "gguf" and card.data.pipeline_tag == "text-generation"
    assert {"gguf", "imatrix", "quantkit", "russian"} <= set(card.data.tags)
    assert f"llama-cli -hf {GGUF_REPO}:Q4_K_M" in card.text
    assert f"ollama run hf.co/{GGUF_REPO}:Q4_K_M" in card.text
    assert "Q2_K" not in card.text.split("## Usage")[0]  # not in the table of published files
    assert hub.calls("POST", r"^/api/validate-yaml$")

    # the workspace remembers where it went (and nothing secret)
    manifest = json.loads((ws.root / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["published"]["gguf"]["repo"] == GGUF_REPO


def test_rerun_after_5xx_sends_only_what_is_missing(tmp_path: Path, hub: FakeHub) -> None:
    ws = build_workspace(tmp_path / "ws")
    hub.fail("POST", r"/commit/main$", 500, times=1000, after=2)  # BF16 and Q8_0 get through, then the Hub breaks
    first = push(hub, ws.root / "gguf")
    assert first.returncode != 0
    assert "HTTP 500" in error_line(first) and "run the same command again" in error_line(first)
    assert len(hub.calls("POST", "/commit/")) == 2 + COMMIT_TRIES  # the failing commit was retried
    sent_first = hub.lfs_puts()
    committed = {p for r in hub.calls("POST", "/commit/") if r.status == 200 for p in r.detail}
    assert any("BF16" in p for p in committed) and f"{MODEL}-Q8_0.gguf" in committed

    hub.clear_failures()
    n_requests = len(hub.requests)
    second = push(hub, ws.root / "gguf", "--json")
    assert second.returncode == 0, second.stderr
    later = hub.requests[n_requests:]
    # nothing uploaded by the first run is sent again: not the committed files, not the object of the failed commit
    sent_second = [r.detail for r in later if r.method == "PUT" and r.status == 200]
    assert not set(sent_second) & set(sent_first)
    assert len(sent_first) == 4  # BF16 (2 parts) and Q8_0 committed; Q6_K uploaded, its commit refused
    recommitted = {p for r in later if r.method == "POST" and "/commit/" in r.path for p in r.detail}
    assert not recommitted & committed
    result = json.loads(second.stdout)
    assert {f["path"] for f in result["skipped"]} >= committed
    assert set(hub.files(GGUF_REPO)) == {*local_files(ws, "gguf"), f"{MODEL}-imatrix.gguf", "README.md", "quality.csv",
                                       ".gitattributes"}
    for name, local in local_files(ws, "gguf").items():
        assert hub.files(GGUF_REPO)[name] == local.read_bytes()

    # a third run finds everything in place and sends nothing
    n_requests = len(hub.requests)
    third = push(hub, ws.root / "gguf", "--json")
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["files"] == []
    assert not [r for r in hub.requests[n_requests:] if r.method == "PUT" or "/commit/" in r.path]


def test_429_and_5xx_are_retried(tmp_path: Path, hub: FakeHub) -> None:
    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    hub.fail("POST", r"/commit/", 429, times=2)  # the commit: retried by quantkit, honouring Retry-After
    hub.fail("POST", r"/preupload/", 503, times=1)  # preupload: retried by the client itself
    hub.fail("GET", r"/api/whoami-v2$", 502, times=1)
    run = push(hub, ws.root, "--format", "gguf", "--repo", "my-russian-quants", "--json")
    assert run.returncode == 0, run.stderr
    repo = f"{USER}/my-russian-quants"  # a bare name lands in the token's namespace
    assert json.loads(run.stdout)["repo"] == repo
    statuses = [r.status for r in hub.calls("POST", "/commit/")]
    assert statuses[:3] == [429, 429, 200]
    assert "retrying" in run.stderr
    assert set(hub.files(repo)) == {*local_files(ws, "gguf"), f"{MODEL}-imatrix.gguf", "README.md", "quality.csv",
                                       ".gitattributes"}


# -- EXL2 and GPTQ -----------------------------------------------------------------------------------------------------
def test_exl2_bitrates_become_branches(tmp_path: Path, hub: FakeHub, download: Callable[..., bytes]) -> None:
    ws = build_workspace(tmp_path / "ws", "exl2")
    run = push(hub, ws.root / "exl2", "--private", "--json")
    assert run.returncode == 0, run.stderr
    repo = f"{USER}/{MODEL}-EXL2"
    result = json.loads(run.stdout)
    assert result["branches"] == ["main", "4.0bpw", "5.0bpw", "6.5bpw"]
    assert hub.repos[repo].private
    assert set(hub.repos[repo].branches) == {"main", "4.0bpw", "5.0bpw", "6.5bpw"}
    main = hub.files(repo, "main")
    assert set(main) == {".gitattributes", "README.md", "quality.csv", "measurement.json"}
    assert main["measurement.json"] == (ws.root / "exl2" / "measurement.json").read_bytes()
    for bits in ("4.0bpw", "5.0bpw", "6.5bpw"):
        branch = hub.files(repo, bits)
        for name in ("config.json", "output.safetensors", "tokenizer.json"):
            assert branch[name] == (ws.root / "exl2" / bits / name).read_bytes()
        assert "README.md" in branch
    assert download(repo, "output.safetensors", revision="4.0bpw") == \
        (ws.root / "exl2" / "4.0bpw" / "output.safetensors").read_bytes()
    meta = front_matter(main["README.md"].decode())
    assert meta["library_name"] == "exllamav2" and "exl2" in meta["tags"]
    assert "--revision 4.0bpw" in main["README.md"].decode()


def test_gptq_recommended_variant_on_main(tmp_path: Path, hub: FakeHub) -> None:
    ws = build_workspace(tmp_path / "ws", "gptq")
    run = push(hub, ws.root / "gptq", "--json")
    assert run.returncode == 0, run.stderr
    repo = f"{USER}/{MODEL}-GPTQ"
    assert json.loads(run.stdout)["branches"] == ["main", "8bit-g128"]
    assert hub.files(repo)["model.safetensors"] == (ws.root / "gptq" / "4bit-g128" / "model.safetensors").read_bytes()
    assert hub.files(repo, "8bit-g128")["model.safetensors"] == \
        (ws.root / "gptq" / "8bit-g128" / "model.safetensors").read_bytes()


# -- refusals ----------------------------------------------------------------------------------------------------------
def test_missing_token_is_refused_before_any_request(tmp_path: Path, hub: FakeHub) -> None:
    ws = build_workspace(tmp_path / "ws")
    run = push(hub, ws.root / "gguf", token=None, env={"HF_HOME": str(tmp_path / "empty-home")})
    assert run.returncode == 2
    assert "no Hugging Face token" in error_line(run) and "hf auth login" in error_line(run)
    assert hub.requests == []
    assert not (ws.root / "gguf" / "README.md").exists()


def test_read_only_token_is_refused_before_any_upload(tmp_path: Path, hub: FakeHub) -> None:
    ws = build_workspace(tmp_path / "ws")
    run = push(hub, ws.root / "gguf", token=READ_TOKEN)
    assert run.returncode == 2
    assert "read-only" in error_line(run)
    assert {r.path for r in hub.requests} <= {"/api/whoami-v2", "/api/agent-harnesses"}
    assert hub.repos == {}


def test_dry_run_lists_files_and_contacts_nothing(tmp_path: Path, hub: FakeHub) -> None:
    ws = build_workspace(tmp_path / "ws", "exl2")
    run = push(hub, ws.root / "exl2", "--dry-run", "--json", token=None)
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["dry_run"] and plan["repo"].endswith(f"/{MODEL}-EXL2")
    by_branch = {b["name"]: {f["path"]: f["size"] for f in b["files"]} for b in plan["branches"]}
    assert set(by_branch) == {"main", "4.0bpw", "5.0bpw", "6.5bpw"}
    assert by_branch["4.0bpw"]["output.safetensors"] == (ws.root / "exl2/4.0bpw/output.safetensors").stat().st_size
    assert by_branch["main"]["README.md"] > 1000 and "measurement.json" in by_branch["main"]
    assert plan["total_size"] == sum(sum(b.values()) for b in by_branch.values())
    human = push(hub, ws.root / "exl2", "--dry-run", token=None)
    assert human.returncode == 0 and "output.safetensors" in human.stdout and "nothing was sent" in human.stdout
    assert hub.requests == []
    assert not (ws.root / "exl2" / "README.md").exists()


def test_gate_failed_artifact_needs_force(tmp_path: Path, hub: FakeHub) -> None:
    ws = build_workspace(tmp_path / "ws")
    for key in [k for k, e in ws.artifacts.items() if e["quant"] != "Q2_K"]:
        del ws.artifacts[key]
    ws.save()
    refused = push(hub, ws.root / "gguf")
    assert refused.returncode == 3
    assert "quality gate" in error_line(refused) and "--force" in error_line(refused)
    assert not [r for r in hub.requests if r.method in ("POST", "PUT")]

    forced = push(hub, ws.root / "gguf", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    files = hub.files(GGUF_REPO)
    assert files[f"{MODEL}-Q2_K.gguf"] == (ws.root / "gguf" / f"{MODEL}-Q2_K.gguf").read_bytes()
    row = next(line for line in files["README.md"].decode().splitlines() if "| Q2_K |" in line)
    assert "✗ failed the quality gate" in row


def test_offline_mode_is_one_clear_error(tmp_path: Path, hub: FakeHub) -> None:
    ws = build_workspace(tmp_path / "ws")
    run = push(hub, ws.root / "gguf", env={"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2 and "HF_HUB_OFFLINE" in error_line(run) and "retrying" not in run.stderr
    assert hub.requests == []


def test_private_is_not_silently_ignored(tmp_path: Path, hub: FakeHub) -> None:
    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    assert push(hub, ws.root / "gguf").returncode == 0
    again = push(hub, ws.root / "gguf", "--private")
    assert again.returncode == 2 and "already exists and is public" in error_line(again)


def test_single_file_over_50_gb_is_refused(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    big = ws.root / "gguf" / f"{MODEL}-Q8_0.gguf"
    with open(big, "r+b") as f:
        f.truncate(MAX_FILE_SIZE + 1)  # sparse: takes no disk
    with pytest.raises(QuantkitError) as err:
        layout(ws, "gguf")
    assert "50" in err.value.message and "--split-max-size" in (err.value.hint or "")


def test_plan_publish_includes_planned_outputs(tmp_path: Path) -> None:
    """`quantkit gguf|exl2 ... --push --dry-run` plans: what the backend would write is listed too."""
    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    planned = [
        {"step": "convert → BF16", "output": f"gguf/{MODEL}-BF16.gguf", "estimated_size": 15e9, "done": True},
        {"step": "imatrix", "output": "gguf/imatrix.gguf", "estimated_size": None, "done": True},
        {"step": "quantize → IQ4_XS", "output": f"gguf/{MODEL}-IQ4_XS.gguf", "estimated_size": 4_250_000_000,
         "done": False},
    ]
    plan = plan_publish(ws, "gguf", repo="me/x", private=True, planned=planned)
    files = {f["path"]: f for f in plan["branches"][0]["files"]}
    assert files[f"{MODEL}-IQ4_XS.gguf"]["planned"] and files[f"{MODEL}-IQ4_XS.gguf"]["size"] == 4_250_000_000
    assert f"{MODEL}-Q4_K_M.gguf" in files and not files[f"{MODEL}-Q4_K_M.gguf"].get("planned")
    assert plan["repo"] == "me/x" and plan["private"]

    exl2 = [{"step": "calibration", "output": "exl2/calibration.parquet", "estimated_size": 1e6, "done": False},
            {"step": "measurement", "output": "exl2/measurement.json", "estimated_size": 1e5, "done": False},
            {"step": "quantize 4.0 bpw", "output": "exl2/4.0bpw/", "estimated_size": 4e9, "done": False, "bits": 4.0}]
    plan = plan_publish(ws, "exl2", repo=None, private=False, planned=exl2)
    assert [b["name"] for b in plan["branches"]] == ["main", "4.0bpw"]
    assert plan["branches"][1]["size"] == 4_000_000_000 and plan["repo"].endswith(f"/{MODEL}-EXL2")
    assert plan_publish(ws, "gptq", repo=None, private=False, planned=[])["branches"] == []


# -- the token --------------------------------------------------------------------------------------------------------
def test_token_never_leaks(tmp_path: Path, hub: FakeHub) -> None:
    ws = build_workspace(tmp_path / "ws")
    outputs = []
    ok = push(hub, ws.root / "gguf", "--json", token=SECRET)
    assert ok.returncode == 0, ok.stderr
    outputs.append(ok)
    hub.fail("POST", r"/commit/", 503, times=1000)
    (ws.root / "gguf" / f"{MODEL}-Q4_K_M.gguf").write_bytes(b"changed")  # something to commit
    broken = push(hub, ws.root / "gguf", token=SECRET)
    assert broken.returncode != 0
    outputs.append(broken)
    hub.clear_failures()
    wrong = push(hub, ws.root / "gguf", token=SECRET + "x")  # a token the Hub does not know
    assert wrong.returncode == 2 and "rejected the token" in error_line(wrong)
    outputs.append(wrong)
    for run in outputs:
        assert SECRET not in run.stdout and SECRET not in run.stderr
    for path in ws.root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    for name, data in hub.files(GGUF_REPO).items():
        assert SECRET.encode() not in data, name

    # a file that holds the token is never uploaded
    ws2 = build_workspace(tmp_path / "ws2", "exl2")
    config = ws2.root / "exl2" / "5.0bpw" / "config.json"
    config.write_text(json.dumps({"note": f"token {SECRET}"}), encoding="utf-8")
    leak = push(hub, ws2.root / "exl2", token=SECRET)
    assert leak.returncode == 2 and "contains your Hugging Face token" in error_line(leak)
    assert SECRET not in leak.stderr and SECRET not in leak.stdout
    assert f"{USER}/{MODEL}-EXL2" not in hub.repos
    assert scrub(f"401 for Bearer {SECRET} at x", SECRET) == "401 for Bearer *** at x"
