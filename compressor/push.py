"""Publishing a pruned checkpoint to the Hugging Face Hub, with a regenerated model card.

`prepare` decides what would be pushed and whether it may be, without the network: it finds the
checkpoint (a `prune` folder, or the ``hf/`` of a `run` folder), checks it against its manifest
(`manifest.py`), reads the validation report (the run's ``report/``, or ``--report``), refuses
an unverified, changed or gate-failed folder unless forced, and renders the card (`card.py`).
`push` then sends it in one commit with huggingface_hub: the repo is created if needed, large
files go through the library's LFS upload, and weight files a previous push left behind that
this one does not replace are deleted in the same commit (a stale ``model.safetensors`` beside
a new sharded index would be what transformers loads). A commit is atomic on the Hub: a
failure before it leaves the repo as it was. After it, the Hub's listing of the pushed
revision is compared with the local files (sizes and hashes) before success is reported.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .card import facts_from_folder, render_card
from .errors import HubError, InputError, PushRefusedError, VerificationError
from .manifest import MANIFEST, check_folder, folder_files, sha256
from .validate import REPORT_FORMAT

log = logging.getLogger(__name__)

REPORT_FILES = ("report.json", "report.md", "report.html")
REPORT_DIR = "validation"  # where the report lands in the repo
# Files a previous push may have left that would change what loads (or what is reported).
STALE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "onnx/*", f"{REPORT_DIR}/*", MANIFEST)


@dataclass
class PushPlan:
    """Everything `push` will send, and why it may (or may not) be sent."""

    checkpoint: Path
    repo_id: str
    files: list[tuple[str, Path]]  # (path in the repo, local file), the card excluded
    card: str
    report: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)  # overridden with force
    forced: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for _, path in self.files) + len(self.card.encode())

    def describe(self, *, private: bool = False, revision: str | None = None, create_pr: bool = False) -> str:
        target = f"{self.repo_id} ({'private' if private else 'public'}, {'a pull request against ' if create_pr else ''}"
        target += f"branch {revision or 'main'})"
        lines = [f"target: {target}", f"from: {self.checkpoint}", "files:"]
        rows = [("README.md", len(self.card.encode()), "model card, regenerated")] + [
            (name, path.stat().st_size, "") for name, path in self.files
        ]
        width = max(len(name) for name, _, _ in rows)
        lines += [f"  {name.ljust(width)}  {_size(size):>10}  {note}".rstrip() for name, size, note in rows]
        lines.append(f"  {len(rows)} files, {_size(self.total_bytes)}")
        if self.report:
            lines.append(f"validation: {(self.report.get('verdict') or {}).get('summary', '?')}")
        else:
            lines.append("validation: no report (the card makes no accuracy claim)")
        lines += [f"{'forced past' if self.forced else 'refused'}: {problem}" for problem in self.problems]
        return "\n".join(lines)


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    created_repo: bool
    deleted: list[str]
    verified: int  # files whose size and hash on the Hub were compared with the local ones


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = None if repo_id.count("/") == 1 else "it must name the owner: ORG/NAME or USER/NAME"
    if problem is None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            problem = str(error)
    if problem:
        raise InputError(
            f"--repo-id '{repo_id}' is not a Hub repository id ({problem}).",
            fix="use ORG/NAME: letters, digits, '-', '_' and '.', no '--' or '..', at most 96 characters.",
        )


def locate(out: Path, report: Path | None) -> tuple[Path, Path | None]:
    """The checkpoint folder and the report file of a `prune` folder or a `run` folder."""
    if not out.is_dir():
        raise InputError(f"'{out}' is not a folder.", fix="pass the output folder of `compressor prune` or `compressor run`.")
    checkpoint = out / "hf" if not (out / MANIFEST).is_file() and (out / "hf").is_dir() else out
    if report is None and checkpoint != out and (out / "report" / "report.json").is_file():
        report = out / "report" / "report.json"
    if report is not None and report.is_dir():
        report = report / "report.json"
    if report is not None and not report.is_file():
        raise InputError(
            f"Validation report '{report}' does not exist.", fix="pass the report.json (or its folder) of `compressor validate`."
        )
    return checkpoint, report


def load_report(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The validation report, checked to be about this checkpoint (same blocks removed, same size)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"Validation report '{path}' is not readable JSON ({error}).", fix="rerun `compressor validate`.") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise InputError(f"'{path}' is not a {REPORT_FORMAT} report.", fix="pass the report.json written by `compressor validate`.")
    pruned = (report.get("models") or {}).get("pruned") or {}
    blocks = manifest.get("blocks") or {}
    expected = {"removed": blocks.get("removed"), "num_blocks": blocks.get("after"), "params": (manifest.get("params") or {}).get("after")}
    differing = [f"{k} {pruned.get(k)} (checkpoint: {v})" for k, v in expected.items() if v is not None and pruned.get(k) != v]
    if differing:
        raise InputError(
            f"Validation report '{path}' is about another model: " + "; ".join(differing) + ".",
            fix="validate this checkpoint (`compressor validate --pruned FOLDER ...`) and pass that report.",
        )
    return report


def prepare(
    out: Path | str, repo_id: str, *, report: Path | str | None = None, license: str | None = None, force: bool = False
) -> PushPlan:
    """What would be pushed; raises PushRefusedError when it may not be (and ``force`` is off)."""
    check_repo_id(repo_id)
    checkpoint, report_path = locate(Path(out), Path(report) if report is not None else None)
    check = check_folder(checkpoint)
    if check.manifest is None:
        raise PushRefusedError(
            f"'{checkpoint}' {check.problem()}, so there is nothing to say on its card.",
            fix="export it with `compressor prune` (`--plan plan.json` reuses a plan) and push that folder.",
        )
    if check.missing:  # not even --force: the repo would lack files its config or index names
        raise PushRefusedError(
            f"'{checkpoint}' lacks files its export wrote: {', '.join(check.missing[:5])}.",
            fix="restore them (or export again); --force does not publish an incomplete checkpoint.",
        )
    problems = [f"'{checkpoint}' does not match its export manifest ({check.problem()})"] if not check.verified else []
    report_data = load_report(report_path, check.manifest) if report_path is not None else None
    if report_data is not None and not (report_data.get("verdict") or {}).get("passed", False):
        problems.append(f"its validation gate failed ({(report_data.get('verdict') or {}).get('summary', 'FAIL')}; {report_path})")
    if problems and not force:
        raise PushRefusedError(
            "Not pushing: " + "; ".join(problems) + ".",
            fix="re-export or re-validate, or pass --force to publish anyway (the card then shows the failure).",
        )
    files = [(p.relative_to(checkpoint).as_posix(), p) for p in folder_files(checkpoint) if p.name != "README.md" or p.parent != checkpoint]
    report_path_in_repo = None
    if report_path is not None:
        for name in REPORT_FILES:
            if (report_path.parent / name).is_file():
                files.append((f"{REPORT_DIR}/{name}", report_path.parent / name))
        report_path_in_repo = f"{REPORT_DIR}/report.md" if (report_path.parent / "report.md").is_file() else f"{REPORT_DIR}/report.json"
    facts = facts_from_folder(checkpoint, name=repo_id.split("/")[1], report=report_data, report_path=report_path_in_repo)
    card = render_card(facts, license=license, repo_id=repo_id, warnings=[f"Published with --force: {p}." for p in problems])
    return PushPlan(checkpoint=checkpoint, repo_id=repo_id, files=files, card=card, report=report_data, problems=problems, forced=force)


def resolve_token(token: str | None = None) -> str:
    """An explicit token, else ``HF_TOKEN``, else the saved login; never logged."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubError(
            "No Hugging Face token: pushing needs one with write access.",
            fix="set HF_TOKEN, or run `hf auth login` (or `huggingface-cli login`) once.",
        )
    return token


def push(
    plan: PushPlan,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload ``plan`` in one commit; create the repo (and branch) first when needed."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set: pushing needs the network.", fix="unset HF_HUB_OFFLINE (or set it to 0) and retry.")
    api = HfApi(endpoint=endpoint, token=resolve_token(token))
    with _hub_errors(plan.repo_id, api.endpoint):
        user = api.whoami()
        log.info("pushing as %s to %s/%s", user.get("name"), api.endpoint, plan.repo_id)
        created = not api.repo_exists(plan.repo_id)
        repo_url = api.create_repo(plan.repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
        existing = [] if created else api.list_repo_files(plan.repo_id, revision=revision)
        names = {name for name, _ in plan.files}
        stale = [f for f in existing if f not in names and any(fnmatch.fnmatch(f, p) for p in STALE_PATTERNS)]
        operations: list[Any] = [CommitOperationAdd("README.md", plan.card.encode())]
        operations += [CommitOperationAdd(name, str(path)) for name, path in plan.files]
        operations += [CommitOperationDelete(name) for name in stale]
        info = api.create_commit(
            plan.repo_id,
            operations,
            commit_message=commit_message or _default_message(plan),
            commit_description=_description(plan),
            revision=revision,
            create_pr=create_pr,
        )
        verified = verify_upload(api, plan, info.pr_revision or revision or "main")
    return PushResult(
        repo_url=str(repo_url),
        commit_url=info.commit_url,
        commit_oid=info.oid,
        pr_url=info.pr_url,
        created_repo=created,
        deleted=stale,
        verified=verified,
    )


def verify_upload(api: Any, plan: PushPlan, revision: str) -> int:
    """Compare what the Hub now holds at ``revision`` with what was sent: size, and the SHA-256
    (LFS files) or git blob id (the others) of every file. Returns how many were checked."""
    from huggingface_hub.hf_api import RepoFile

    remote = {f.path: f for f in api.list_repo_tree(plan.repo_id, revision=revision, recursive=True) if isinstance(f, RepoFile)}
    recorded = json.loads((plan.checkpoint / MANIFEST).read_text())["files"]
    sent: list[tuple[str, bytes | Path]] = [("README.md", plan.card.encode()), *plan.files]
    wrong = []
    for name, local in sent:
        entry = remote.get(name)
        size = len(local) if isinstance(local, bytes) else local.stat().st_size
        if entry is None or entry.size != size:
            wrong.append(name)
        elif entry.lfs is not None:
            digest = recorded.get(name, {}).get("sha256") if isinstance(local, Path) and name in recorded else None
            if entry.lfs.sha256 != (digest or _sha256(local)):
                wrong.append(name)
        elif entry.blob_id != _git_blob_id(local):
            wrong.append(name)
    if wrong:
        raise VerificationError(
            f"The Hub's copy of '{plan.repo_id}' ({revision}) differs from the local files: {', '.join(wrong[:5])}.",
            fix="push again; if it persists, compare the files on the Hub with the folder by hand.",
        )
    return len(sent)


def _sha256(local: bytes | Path) -> str:
    return hashlib.sha256(local).hexdigest() if isinstance(local, bytes) else sha256(local)


def _git_blob_id(local: bytes | Path) -> str:
    data = local if isinstance(local, bytes) else local.read_bytes()  # regular (non-LFS) files are small
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _default_message(plan: PushPlan) -> str:
    manifest = json.loads((plan.checkpoint / MANIFEST).read_text())
    blocks = manifest.get("blocks") or {}
    removed = blocks.get("removed") or []
    return f"Upload depth-pruned model: {len(removed)} of {blocks.get('before')} blocks removed (compressor)"


def _description(plan: PushPlan) -> str:
    verdict = (plan.report or {}).get("verdict") or {}
    lines = [f"Validation: {verdict.get('summary', 'no report')}."]
    lines += [f"Pushed with --force: {p}." for p in plan.problems]
    return "\n".join(lines)


def _http_errors() -> tuple[tuple[type[BaseException], ...], type[BaseException]]:
    """(could-not-reach errors, base HTTP error) of the HTTP library huggingface_hub uses: requests
    before huggingface_hub 1.0, httpx since (``httpx2`` in 2.x), when requests may not be installed.
    huggingface_hub's own HTTP errors derive from the library's, which it imports as ``HTTPError``."""
    from huggingface_hub.errors import HfHubHTTPError

    http_error = HfHubHTTPError.__mro__[1]
    library = importlib.import_module(http_error.__module__.split(".")[0])
    if hasattr(library, "TransportError"):  # httpx: connect, timeout, network, protocol and proxy failures
        return (library.TransportError,), http_error
    return (library.ConnectionError, library.Timeout), http_error


class _hub_errors:
    """Turn huggingface_hub's exceptions and its HTTP library's into messages that name the fix."""

    def __init__(self, repo_id: str, endpoint: str):
        self.repo_id, self.endpoint = repo_id, endpoint

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> bool:
        if error is None:
            return False
        from huggingface_hub.errors import OfflineModeIsEnabled

        unreachable, http_error = _http_errors()
        if isinstance(error, OfflineModeIsEnabled):
            raise HubError("huggingface_hub is in offline mode: pushing needs the network.", fix="unset HF_HUB_OFFLINE.") from None
        if isinstance(error, unreachable):
            raise HubError(
                f"Could not reach {self.endpoint} ({type(error).__name__}); nothing was committed.",
                fix="check the network (or HF_ENDPOINT) and push again.",
            ) from None
        if isinstance(error, http_error):  # huggingface_hub's HfHubHTTPError is one (whoami may raise the plain kind)
            response = getattr(error, "response", None)
            status = response.status_code if response is not None else None
            if status == 401:
                raise HubError(
                    f"The Hub rejected the token ({self.endpoint}, HTTP 401); nothing was committed.",
                    fix="set HF_TOKEN to a valid token with write access, or `hf auth login` again.",
                ) from None
            if status == 403:
                raise HubError(
                    f"The token may not write to '{self.repo_id}' (HTTP 403); nothing was committed.",
                    fix="use a token with write access to that namespace, or push to your own namespace.",
                ) from None
            detail = getattr(error, "server_message", None) or error
            raise HubError(
                f"The Hub refused the push to '{self.repo_id}' (HTTP {status}: {detail}); nothing was committed.",
                fix="check the repo id, branch and permissions, then push again.",
            ) from None
        return False
