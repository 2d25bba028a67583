"""pipeline.storage against a local folder and a moto S3 bucket."""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from pipeline import storage
from pipeline.errors import BadInputError, OutputError
from pipeline.storage import SourceFile, Storage, is_inside, retry, safe_relpath

IMAGES = frozenset({".jpg", ".jpeg", ".png", ".heic"})


@dataclass
class Tree:
    """A storage root plus ways to put and list objects that bypass `Storage`."""

    uri: str
    put: Callable[[str, bytes], None]
    keys: Callable[[], list[str]]  # every file/object under the root, relative, sorted


def _local_tree(tmp_path) -> Tree:
    root = tmp_path / "photos"
    root.mkdir()

    def put(rel, data):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def keys():
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    return Tree(str(root), put, keys)


def _s3_tree(bucket_uri: str) -> Tree:
    import boto3

    client, bucket, prefix = boto3.client("s3"), bucket_uri[5:], "photos/"

    def put(rel, data):
        client.put_object(Bucket=bucket, Key=prefix + rel, Body=data)

    def keys():
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"][len(prefix) :] for p in pages for o in p.get("Contents", []))

    return Tree(f"{bucket_uri}/photos", put, keys)


@pytest.fixture(params=["local", "s3"])
def tree(request, tmp_path) -> Tree:
    if request.param == "local":
        return _local_tree(tmp_path)
    return _s3_tree(request.getfixturevalue("s3_bucket"))


# ----------------------------------------------------------------------------- listing


def test_list_files_recursive_filtered(tree):
    for rel in [
        "a.jpg",
        "b.JPEG",
        "c.Png",
        "notes.txt",
        "raw.cr2",
        "noext",
        "2023/summer/beach.jpg",
        "2023/summer/Beach.TXT",
        "ünï cödé/fötö 1.JPG",
        "with space/x y.png",
        ".hidden.jpg",
        ".thumbs/t.jpg",
        "2023/.cache/deep/c.jpg",
        "2023/.DS_Store",
        "2023/summer/.x.jpg.partial",
    ]:
        tree.put(rel, rel.encode())

    got = list(Storage(tree.uri).list_files(IMAGES))

    assert sorted(f.relpath for f in got) == sorted(
        ["a.jpg", "b.JPEG", "c.Png", "2023/summer/beach.jpg", "ünï cödé/fötö 1.JPG", "with space/x y.png"]
    )
    assert len({f.relpath for f in got}) == len(got)
    for f in got:
        assert f.size == len(f.relpath.encode())


def test_list_files_extensions_without_dot_and_mixed_case(tree):
    tree.put("x/a.JPG", b"1")
    tree.put("x/b.png", b"1")
    assert [f.relpath for f in Storage(tree.uri).list_files(frozenset({"Jpg"}))] == ["x/a.JPG"]


def test_list_files_sees_new_files_on_a_second_listing(tree):
    store = Storage(tree.uri)
    tree.put("a.jpg", b"1")
    assert [f.relpath for f in store.list_files(IMAGES)] == ["a.jpg"]
    tree.put("sub/b.jpg", b"2")
    assert [f.relpath for f in store.list_files(IMAGES)] == ["a.jpg", "sub/b.jpg"]
    tree.put("sub/c.jpg", b"33")  # s3fs has "sub" cached from the listing above
    assert store.exists("sub/c.jpg") and store.size("sub/c.jpg") == 2
    assert store.stat("sub/c.jpg").size == 2


def test_s3_fixture_really_uses_the_local_endpoint(s3_server, s3_bucket):
    import boto3

    assert boto3.client("s3").meta.endpoint_url == s3_server
    store = Storage(s3_bucket)
    store.write_atomic("probe.jpg", b"1")
    assert store.fs.s3.meta.endpoint_url == s3_server  # the s3fs client, once connected
    assert store.fs.s3._endpoint.host == s3_server


def test_list_files_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(Storage(str(tmp_path / "nope")).list_files(IMAGES))


def test_s3_skips_folder_placeholders_and_stays_under_prefix(s3_bucket):
    import boto3

    t = _s3_tree(s3_bucket)
    t.put("empty/", b"")  # "folder" created by a console
    t.put("sub/", b"")
    t.put("sub/a.jpg", b"1")
    boto3.client("s3").put_object(Bucket=s3_bucket[5:], Key="photos2/outside.jpg", Body=b"1")
    boto3.client("s3").put_object(Bucket=s3_bucket[5:], Key="outside.jpg", Body=b"1")
    got = list(Storage(t.uri).list_files(IMAGES))
    assert [f.relpath for f in got] == ["sub/a.jpg"]


# ----------------------------------------------------------------------- symbolic links


def test_a_linked_photo_is_listed_at_the_links_path_with_the_fingerprint_of_its_file(tmp_path):
    t = _local_tree(tmp_path)
    t.put("archive/2023/beach.jpg", b"the photo")
    os.makedirs(os.path.join(t.uri, "favourites"))
    os.symlink("../archive/2023/beach.jpg", os.path.join(t.uri, "favourites", "best.jpg"))
    store = Storage(t.uri)
    listed = {f.relpath: f for f in store.list_files(IMAGES)}
    assert set(listed) == {"archive/2023/beach.jpg", "favourites/best.jpg"}
    link, photo = listed["favourites/best.jpg"], listed["archive/2023/beach.jpg"]
    assert (link.size, link.fingerprint, link.broken) == (photo.size, photo.fingerprint, "")
    assert store.stat("favourites/best.jpg") == link  # a rerun's fingerprint is the file's, not the link's
    assert store.read_bytes("favourites/best.jpg") == b"the photo"


def test_a_dangling_link_and_a_loop_of_links_are_listed_as_broken(tmp_path):
    t = _local_tree(tmp_path)
    os.symlink("../gone/missing.jpg", os.path.join(t.uri, "dangling.jpg"))
    os.symlink("loop-b.jpg", os.path.join(t.uri, "loop-a.jpg"))
    os.symlink("loop-a.jpg", os.path.join(t.uri, "loop-b.jpg"))
    listed = {f.relpath: f.broken for f in Storage(t.uri).list_files(IMAGES)}
    assert listed == {
        "dangling.jpg": "dangling symbolic link -> ../gone/missing.jpg",
        "loop-a.jpg": "symbolic link loop -> loop-b.jpg (it never reaches a file)",
        "loop-b.jpg": "symbolic link loop -> loop-a.jpg (it never reaches a file)",
    }


def test_each_linked_folder_is_listed_once_and_a_loop_is_named_once(tmp_path, caplog):
    t = _local_tree(tmp_path)
    t.put("archive/a.jpg", b"1")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "b.jpg").write_bytes(b"2")
    (elsewhere / "sub" / "c.jpg").write_bytes(b"3")
    root = t.uri
    os.symlink("archive", os.path.join(root, "albums"))  # a folder under the root: listed at its own path
    os.symlink(str(elsewhere), os.path.join(root, "linked"))  # outside: followed, once
    os.symlink(str(elsewhere), os.path.join(root, "linked-again"))  # the same folder again
    os.symlink(str(elsewhere / "sub"), os.path.join(root, "a-sub"))  # a folder the first link also reaches
    os.symlink("..", os.path.join(root, "archive", "up"))  # a loop back to the root
    os.symlink(root, str(elsewhere / "back"))  # a loop through the linked folder
    with caplog.at_level("WARNING", logger="pipeline.storage"):
        listed = [f.relpath for f in Storage(root).list_files(IMAGES)]
    assert sorted(listed) == ["a-sub/c.jpg", "archive/a.jpg", "linked/b.jpg"]
    loops = [r.getMessage() for r in caplog.records if "loop" in r.getMessage()]
    assert loops == [
        f"symbolic link loop: {root}/archive/up -> .. leads back into a folder it is in; not followed",
        f"symbolic link loop: {root}/linked/back -> {root} leads back into a folder it is in; not followed",
    ]


def test_a_link_into_an_excluded_folder_is_not_followed(tmp_path, caplog):
    t = _local_tree(tmp_path)
    t.put("a.jpg", b"1")
    output = tmp_path / "out"
    (output / "images").mkdir(parents=True)
    (output / "images" / "a.jpg").write_bytes(b"2")
    os.symlink(str(output), os.path.join(t.uri, "results"))
    os.symlink(str(output / "images"), os.path.join(t.uri, "edited"))
    with caplog.at_level("WARNING", logger="pipeline.storage"):
        listed = [f.relpath for f in Storage(t.uri).list_files(IMAGES, excluded=[str(output)])]
    assert listed == ["a.jpg"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{t.uri}/{name} leads into {output}, which is left out of the listing; not followed"
        for name in ("edited", "results")
    ]
    assert [f.relpath for f in Storage(t.uri).list_files(IMAGES)] == ["a.jpg", "edited/a.jpg"]  # images: once
    holding_the_root = Storage(t.uri).list_files(IMAGES, excluded=[str(tmp_path)])  # excludes nothing
    assert [f.relpath for f in holding_the_root] == ["a.jpg", "edited/a.jpg"]


# ------------------------------------------------------------------------ fingerprints


def _fingerprint(store: Storage, rel: str) -> str:
    (f,) = [f for f in store.list_files(IMAGES) if f.relpath == rel]
    assert f == store.stat(rel)
    return f.fingerprint


def test_fingerprint_changes_when_content_is_replaced(tree):
    store = Storage(tree.uri)
    tree.put("d/a.jpg", b"first version")
    before = _fingerprint(store, "d/a.jpg")
    tree.put("d/a.jpg", b"second, longer version")
    after = _fingerprint(store, "d/a.jpg")
    assert before != after
    assert _fingerprint(store, "d/a.jpg") == after  # stable while unchanged


def test_s3_fingerprint_is_etag_and_tracks_same_size_content(s3_bucket):
    t = _s3_tree(s3_bucket)
    store = Storage(t.uri)
    t.put("a.jpg", b"AAAA")
    before = _fingerprint(store, "a.jpg")
    t.put("a.jpg", b"BBBB")
    after = _fingerprint(store, "a.jpg")
    assert before.startswith("etag:") and after.startswith("etag:")
    assert '"' not in before and before != after


def test_local_fingerprint_is_mtime_and_size(tmp_path):
    t = _local_tree(tmp_path)
    store = Storage(t.uri)
    t.put("a.jpg", b"AAAA")
    before = _fingerprint(store, "a.jpg")
    assert before.startswith("mtime:") and before.endswith(":4")
    path = os.path.join(t.uri, "a.jpg")
    st = os.stat(path)
    t.put("a.jpg", b"BBBB")  # same size; mtime moves on (forced: coarse kernel clocks)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _fingerprint(store, "a.jpg") != before


# ---------------------------------------------------------------------- read and write


def test_read_exists_size_uri_of(tree):
    store = Storage(tree.uri + "/")
    assert store.uri == tree.uri
    tree.put("ünï/a b.jpg", b"hello")
    assert store.read_bytes("ünï/a b.jpg") == b"hello"
    assert store.exists("ünï/a b.jpg")
    assert not store.exists("ünï/missing.jpg")
    assert store.size("ünï/a b.jpg") == 5
    assert store.uri_of("ünï/a b.jpg") == tree.uri + "/ünï/a b.jpg"
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing.jpg")


def test_uri_forms(tmp_path, s3_bucket):
    local = Storage(str(tmp_path) + "/")
    assert local.is_local and local.uri == str(tmp_path) and local.root == str(tmp_path)
    assert local.uri_of("a/b.jpg") == f"{tmp_path}/a/b.jpg"
    s3 = Storage(s3_bucket + "/out/")
    assert not s3.is_local and s3.uri == s3_bucket + "/out"
    assert s3.root == s3_bucket[5:] + "/out"
    assert s3.uri_of("a/b.jpg") == s3_bucket + "/out/a/b.jpg"


def test_write_atomic_creates_parents_and_leaves_no_temp_files(tree):
    store = Storage(tree.uri)
    store.write_atomic("new/deep/ü x.jpg", b"payload")
    store.write_atomic("new/deep/ü x.jpg", b"payload 2")  # overwrite
    assert store.read_bytes("new/deep/ü x.jpg") == b"payload 2"
    assert tree.keys() == ["new/deep/ü x.jpg"]


def test_write_atomic_rejects_unsafe_relpath(tree):
    with pytest.raises(BadInputError):
        Storage(tree.uri).write_atomic("../escape.jpg", b"x")
    assert tree.keys() == []


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_write_atomic_failure_leaves_nothing_under_final_name(tmp_path, monkeypatch, fail_at):
    t = _local_tree(tmp_path)
    store = Storage(t.uri)
    store.write_atomic("keep.jpg", b"old")

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, fail_at, boom)
    with pytest.raises(OutputError, match="new.jpg"):
        store.write_atomic("a/new.jpg", b"x" * 1000)
    with pytest.raises(OutputError, match="keep.jpg"):
        store.write_atomic("keep.jpg", b"new")
    monkeypatch.undo()

    assert not store.exists("a/new.jpg")
    assert store.read_bytes("keep.jpg") == b"old"  # the old file survives intact
    assert t.keys() == ["keep.jpg"]  # no .partial left behind


def test_memory_filesystem_roundtrip():
    import uuid

    store = Storage(f"memory://storage-test-{uuid.uuid4().hex}")
    store.write_atomic("x/a.jpg", b"1")
    store.write_atomic("b.png", b"22")
    assert [(f.relpath, f.size) for f in store.list_files(IMAGES)] == [("b.png", 2), ("x/a.jpg", 1)]
    assert store.read_bytes("x/a.jpg") == b"1"


def test_storage_pickles(s3_bucket):
    store = pickle.loads(pickle.dumps(Storage(s3_bucket + "/p", {"anon": False})))
    assert store.uri == s3_bucket + "/p" and store.storage_options == {"anon": False}


# --------------------------------------------------------------------------- safe_relpath


@pytest.mark.parametrize(
    "bad",
    [
        "../x.jpg",
        "/abs.jpg",
        "a/../../b.jpg",
        "a//b.jpg",
        "a\\..\\b.jpg",
        "",
        "a/b.jpg/",
        "..",
        "a/\0.jpg",
        "C:/x.jpg",
        ".",
        "./",
    ],
)
def test_safe_relpath_rejects(bad):
    with pytest.raises(BadInputError, match="unsafe relative path"):
        safe_relpath(bad)


@pytest.mark.parametrize(
    "good, expected",
    [("a/b c/ü.jpg", "a/b c/ü.jpg"), ("x.jpg", "x.jpg"), ("./a/./b.jpg", "a/b.jpg"), ("a..b/c...jpg", "a..b/c...jpg")],
)
def test_safe_relpath_accepts(good, expected):
    assert safe_relpath(good) == expected


# --------------------------------------------------------------------------------- retry


def _flaky(errors: list[BaseException], result="ok"):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return fn, calls


def test_retry_recovers_from_transient_errors():
    fn, calls = _flaky([ConnectionError("reset"), ConnectionError("reset")])
    assert retry(fn, base_delay=0) == "ok"
    assert len(calls) == 3


@pytest.mark.parametrize(
    "exc", [FileNotFoundError("x"), PermissionError("x"), OSError(errno.ENOSPC, "disk full"), ValueError("bad")]
)
def test_retry_does_not_retry_permanent_errors(exc):
    fn, calls = _flaky([exc])
    with pytest.raises(type(exc)):
        retry(fn, base_delay=0)
    assert len(calls) == 1


def test_retry_gives_up_with_the_last_error():
    errors = [TimeoutError(f"try {i}") for i in range(3)]
    fn, calls = _flaky(errors)
    with pytest.raises(TimeoutError, match="try 2"):
        retry(fn, attempts=3, base_delay=0)
    assert len(calls) == 3


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


def _s3fs_wrapped(code: str, status: int) -> OSError:
    from s3fs.errors import translate_boto_error

    return translate_boto_error(_client_error(code, status))


@pytest.mark.parametrize(
    "make",
    [
        lambda: _client_error("SlowDown", 503),
        lambda: _client_error("Whatever", 500),
        lambda: _s3fs_wrapped("SlowDown", 503),
        lambda: _s3fs_wrapped("InternalError", 500),
        lambda: _s3fs_wrapped("UnknownButServerSide", 502),
        lambda: __import__("botocore.exceptions").exceptions.EndpointConnectionError(endpoint_url="http://x"),
        lambda: __import__("aiohttp").ServerDisconnectedError(),
        lambda: OSError(errno.ECONNRESET, "reset"),
    ],
)
def test_retry_recognises_cloud_transient_errors(make):
    fn, calls = _flaky([make()])
    assert retry(fn, base_delay=0) == "ok"
    assert len(calls) == 2


@pytest.mark.parametrize("code, status", [("NoSuchKey", 404), ("AccessDenied", 403), ("InvalidArgument", 400)])
def test_retry_does_not_retry_s3_client_errors(code, status):
    fn, calls = _flaky([_s3fs_wrapped(code, status)])
    with pytest.raises(OSError):
        retry(fn, base_delay=0)
    assert len(calls) == 1


def test_storage_retries_transient_read_errors(tmp_path, monkeypatch):
    t = _local_tree(tmp_path)
    t.put("a.jpg", b"data")
    store = Storage(t.uri)
    real, calls = store.fs.cat_file, []

    def flaky_cat(path, *a, **k):
        calls.append(path)
        if len(calls) < 3:
            raise ConnectionResetError("peer reset")
        return real(path, *a, **k)

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    monkeypatch.setattr(store.fs, "cat_file", flaky_cat)
    assert store.read_bytes("a.jpg") == b"data"
    assert len(calls) == 3


# ------------------------------------------------------------------------------ is_inside


@pytest.mark.parametrize(
    "inner, outer, expected",
    [
        ("s3://b/in", "s3://b/in", True),
        ("s3://b/in/out", "s3://b/in", True),
        ("s3://b/in/out/", "s3://b/in/", True),
        ("s3a://b/in/out", "s3://b/in", True),
        ("s3://b/in", "s3://b", True),
        ("s3://b/input2", "s3://b/in", False),
        ("s3://b/in", "s3://b/input2", False),
        ("s3://b2/in", "s3://b/in", False),
        ("s3://b", "s3://b/in", False),
        ("gs://b/in/x", "s3://b/in", False),
        ("memory://a/b", "memory://a", True),
    ],
)
def test_is_inside_uris(inner, outer, expected):
    assert is_inside(inner, outer) is expected


def test_is_inside_local(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "in")
    inp = str(tmp_path / "in")
    assert is_inside(inp, inp)
    assert is_inside(str(tmp_path / "in" / "sub"), inp)
    assert is_inside(str(tmp_path / "in" / "not-yet" / "out"), inp)
    assert is_inside(str(tmp_path / "in" / ".." / "in" / "x"), inp)
    assert is_inside(str(tmp_path / "link" / "out"), inp)  # symlinks resolved
    assert is_inside(f"file://{tmp_path}/in/out", inp)
    assert not is_inside(str(tmp_path / "in2"), inp)
    assert not is_inside(str(tmp_path / "in" / ".." / "out"), inp)
    assert not is_inside(str(tmp_path), inp)
    assert not is_inside(f"s3://bucket{tmp_path}/in", inp)


def test_source_file_is_frozen():
    f = SourceFile("a.jpg", 1, "etag:x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.size = 2  # type: ignore[misc]
