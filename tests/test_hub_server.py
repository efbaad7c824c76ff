"""The fake Hub (tests/hub_server.py) against the real huggingface_hub client: what the client sends arrives as the Hub would keep it."""

from __future__ import annotations

import hashlib

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

# HTTPError: the HTTP library's base error, which whoami raises on a bad token (requests' under
# huggingface_hub < 1, httpx's after: the client no longer uses requests, which may be absent).
from huggingface_hub.errors import HfHubHTTPError, HTTPError, RepositoryNotFoundError, RevisionNotFoundError

from .hub_server import GITATTRIBUTES


@pytest.fixture
def api(fake_hub) -> HfApi:
    return HfApi(endpoint=fake_hub.endpoint, token=fake_hub.token)


def test_whoami_with_the_token(fake_hub, api):
    me = api.whoami()
    assert me["name"] == "tester" and [org["name"] for org in me["orgs"]] == ["org"]
    assert fake_hub.authorization == {f"Bearer {fake_hub.token}"}


def test_bad_or_missing_token_is_401(fake_hub):
    with pytest.raises(HTTPError) as bad:
        HfApi(endpoint=fake_hub.endpoint, token="hf_wrong").whoami()
    assert bad.value.response.status_code == 401
    # No token at all: the repo API refuses too (not a RepositoryNotFoundError: that mapping is for https only).
    with pytest.raises(HfHubHTTPError) as missing:
        HfApi(endpoint=fake_hub.endpoint, token=False).model_info("tester/anything")
    assert missing.value.response.status_code == 401


def test_create_repo_records_private_and_tolerates_exist_ok(fake_hub, api):
    url = api.create_repo("tester/private-model", private=True, exist_ok=True)
    assert url.repo_id == "tester/private-model"
    api.create_repo("tester/private-model", private=False, exist_ok=True)  # 409, absorbed by the client
    api.create_repo("org/public-model", exist_ok=True)
    assert fake_hub.repos["tester/private-model"].private is True
    assert fake_hub.repos["org/public-model"].private is False
    assert fake_hub.files("org/public-model") == {".gitattributes": GITATTRIBUTES}
    with pytest.raises(HfHubHTTPError) as existing:
        api.create_repo("tester/private-model")
    assert existing.value.response.status_code == 409
    with pytest.raises(HfHubHTTPError) as foreign:
        api.create_repo("someone-else/model", exist_ok=True)
    assert foreign.value.response.status_code == 403


def test_commit_regular_and_lfs_files(fake_hub, api, tmp_path):
    api.create_repo("tester/m")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)
    info = api.create_commit(
        "tester/m",
        operations=[
            CommitOperationAdd(path_in_repo="config.json", path_or_fileobj=b'{"a": 1}'),
            CommitOperationAdd(path_in_repo="model.safetensors", path_or_fileobj=str(weights)),
        ],
        commit_message="Upload pruned model",
        commit_description="2 blocks removed",
    )
    assert fake_hub.files("tester/m") == {
        ".gitattributes": GITATTRIBUTES,
        "config.json": b'{"a": 1}',
        "model.safetensors": weights.read_bytes(),
    }
    (commit,) = fake_hub.repos["tester/m"].commits
    assert (commit.revision, commit.message, commit.description, commit.create_pr) == (
        "main",
        "Upload pruned model",
        "2 blocks removed",
        False,
    )
    assert set(commit.added) == {"config.json", "model.safetensors"} and commit.deleted == []
    assert info.oid == commit.oid == fake_hub.repos["tester/m"].heads["main"] and info.pr_url is None
    # The weights went through the LFS batch API and a plain PUT: no Xet.
    methods_paths = set(fake_hub.requests)
    assert {("POST", "/tester/m.git/info/lfs/objects/batch"), ("POST", "/tester/m.git/info/lfs/objects/verify")} <= methods_paths
    assert [path for method, path in fake_hub.requests if method == "PUT"] == [f"/_lfs/{hashlib.sha256(weights.read_bytes()).hexdigest()}"]
    assert not any("xet" in path for _, path in fake_hub.requests)


def test_threshold_forces_lfs_on_small_files(fake_hub, api):
    api.create_repo("tester/m")
    fake_hub.lfs_threshold = 0
    api.create_commit("tester/m", operations=[CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"hello")], commit_message="a")
    assert fake_hub.files("tester/m")["a.txt"] == b"hello"
    assert fake_hub.lfs_objects == {hashlib.sha256(b"hello").hexdigest(): b"hello"}


def test_create_pr_lands_on_a_pr_ref_and_leaves_main(fake_hub, api):
    api.create_repo("tester/m")
    api.create_commit("tester/m", operations=[CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"one")], commit_message="first")
    main_before = fake_hub.files("tester/m")
    info = api.create_commit(
        "tester/m", operations=[CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"two")], commit_message="proposal", create_pr=True
    )
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert fake_hub.files("tester/m", "refs/pr/1")["a.txt"] == b"two"
    assert fake_hub.files("tester/m") == main_before
    assert fake_hub.repos["tester/m"].commits[-1].create_pr is True
    second = api.create_commit(
        "tester/m", operations=[CommitOperationAdd(path_in_repo="b.txt", path_or_fileobj=b"b")], commit_message="another", create_pr=True
    )
    assert second.pr_revision == "refs/pr/2"


def test_commit_to_a_created_branch(fake_hub, api):
    api.create_repo("tester/m")
    api.create_commit("tester/m", operations=[CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"main")], commit_message="m")
    api.create_branch("tester/m", branch="pruned", exist_ok=True)
    api.create_branch("tester/m", branch="pruned", exist_ok=True)  # 409, absorbed by the client
    api.create_commit(
        "tester/m", operations=[CommitOperationAdd(path_in_repo="b.txt", path_or_fileobj=b"branch")], commit_message="b", revision="pruned"
    )
    assert fake_hub.files("tester/m", "pruned") == {".gitattributes": GITATTRIBUTES, "a.txt": b"main", "b.txt": b"branch"}
    assert "b.txt" not in fake_hub.files("tester/m")
    assert fake_hub.repos["tester/m"].commits[-1].revision == "pruned"
    with pytest.raises(RevisionNotFoundError):
        api.create_commit(
            "tester/m", operations=[CommitOperationAdd(path_in_repo="c", path_or_fileobj=b"c")], commit_message="c", revision="nope"
        )


def test_delete_removes_a_file(fake_hub, api):
    api.create_repo("tester/m")
    adds = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=p.encode()) for p in ("keep.txt", "old.txt", "onnx/model.onnx")]
    api.create_commit("tester/m", operations=adds, commit_message="add")
    api.create_commit("tester/m", operations=[CommitOperationDelete("old.txt"), CommitOperationDelete("onnx/")], commit_message="clean up")
    assert set(fake_hub.files("tester/m")) == {".gitattributes", "keep.txt"}
    assert fake_hub.repos["tester/m"].commits[-1].deleted == ["old.txt", "onnx/model.onnx"]


def test_unchanged_files_make_no_commit(fake_hub, api):
    api.create_repo("tester/m")
    api.create_commit("tester/m", operations=[CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"same")], commit_message="a")
    # Preupload reports the oid already there, so the client drops the file and makes no commit.
    api.create_commit("tester/m", operations=[CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"same")], commit_message="again")
    assert len(fake_hub.repos["tester/m"].commits) == 1


def test_readme_metadata_is_validated(fake_hub, api):
    api.create_repo("tester/m")
    card = b"---\nlicense: apache-2.0\n---\n# Model\n"
    api.create_commit("tester/m", operations=[CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card)], commit_message="card")
    assert ("POST", "/api/validate-yaml") in fake_hub.requests
    with pytest.raises(ValueError, match="Invalid metadata"):
        bad = CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=b"---\n[unclosed\n---\n")
        api.create_commit("tester/m", operations=[bad], commit_message="bad card")


def test_list_repo_files_reflects_the_tree(fake_hub, api):
    api.create_repo("tester/m")
    paths = ["config.json", "onnx/model.onnx", "onnx/model.onnx_data", "reports/plots/a.png"]
    api.create_commit(
        "tester/m", operations=[CommitOperationAdd(path_in_repo=p, path_or_fileobj=b"x") for p in paths], commit_message="add"
    )
    fake_hub.tree_page_size = 2  # the client must follow the Link header across pages
    assert sorted(api.list_repo_files("tester/m")) == sorted([".gitattributes", *paths])
    api.create_branch("tester/m", branch="empty-ish", revision="main")
    assert sorted(api.list_repo_files("tester/m", revision="empty-ish")) == sorted([".gitattributes", *paths])
    assert api.model_info("tester/m", revision="main").sha == fake_hub.repos["tester/m"].heads["main"]


def test_unknown_repo_and_revision(fake_hub, api):
    assert api.repo_exists("tester/missing") is False
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/missing")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files("tester/missing")
    with pytest.raises(RepositoryNotFoundError):
        api.create_commit("tester/missing", operations=[CommitOperationAdd(path_in_repo="a", path_or_fileobj=b"a")], commit_message="a")
    api.create_repo("tester/m")
    assert api.repo_exists("tester/m") is True
    with pytest.raises(RevisionNotFoundError):
        api.model_info("tester/m", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files("tester/m", revision="nope")


def test_token_travels_only_in_the_authorization_header(fake_hub, api, tmp_path):
    api.create_repo("tester/m")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\0" * 1024)
    api.create_commit(
        "tester/m", operations=[CommitOperationAdd(path_in_repo="w.safetensors", path_or_fileobj=str(weights))], commit_message="w"
    )
    assert fake_hub.authorization == {f"Bearer {fake_hub.token}"}
    assert not any(fake_hub.token in path for _, path in fake_hub.requests)
