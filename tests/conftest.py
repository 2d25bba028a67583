"""Shared fixtures: a local S3 (moto's standalone server on 127.0.0.1), fresh buckets, and an empty
weights cache."""

from __future__ import annotations

import logging
import os
import uuid

import pytest

_AWS_ENV_DROPPED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


@pytest.fixture(scope="session")
def s3_server():
    """Moto's S3 server on loopback for the whole session; yields its endpoint URL.

    AWS_ENDPOINT_URL (honoured by botocore, hence by boto3 and s3fs) and dummy credentials
    are set for the session and restored afterwards.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    saved = dict(os.environ)
    for key in _AWS_ENV_DROPPED:
        os.environ.pop(key, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_CONFIG_FILE=os.devnull,  # no profile or endpoint from the developer's ~/.aws
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    try:
        yield endpoint
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; yields "s3://<bucket>"."""
    import boto3
    import s3fs

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()  # no stale listings or endpoints from before
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty weights cache: no hub, no weights URLs or depth runtime in the environment."""
    from pipeline import models
    from pipeline.models.hf_depth import RUNTIME_ENV

    root = tmp_path / "cache"
    monkeypatch.setenv("DREAMFOCUS_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("DREAMFOCUS_DEPTH_ANYTHING_URL", "DREAMFOCUS_DPT_URL", "DREAMFOCUS_ISNET_URL", RUNTIME_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(models, "_warned_fallback", set())
    return root
