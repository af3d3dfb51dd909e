"""Credentials never reach a message or a log line."""

import logging

import pytest

from dlorch.core.errors import RedactSecrets, one_line, redact


@pytest.mark.parametrize("text, clean", [
    ("redis://:hunter2@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    ("rediss://dlorch:hunter2@cache.example.org:6380/1", "rediss://dlorch:***@cache.example.org:6380/1"),
    ("cannot reach queue redis://u:p%40ss@h:1/0: refused", "cannot reach queue redis://u:***@h:1/0: refused"),
    ("s3://bucket/key?token=abc123&x=1", "s3://bucket/key?token=***&x=1"),
    ("redis://h:6379/0?password=hunter2", "redis://h:6379/0?password=***"),
    ("redis://127.0.0.1:6379/0 and /plain/path:with@sign", "redis://127.0.0.1:6379/0 and /plain/path:with@sign"),
])
def test_redact(text, clean):
    assert redact(text) == clean


def test_one_line_redacts():
    assert "hunter2" not in one_line(RuntimeError("failed on\nredis://:hunter2@h:1/0"))


def test_the_log_filter_redacts_arguments_too(caplog):
    log = logging.getLogger("dlorch.test-redact")
    handler = logging.Handler()
    seen = []
    handler.emit = lambda record: seen.append(record.getMessage())
    handler.addFilter(RedactSecrets())
    log.addHandler(handler)
    try:
        log.warning("queue %s down", "redis://:hunter2@h:1/0")
    finally:
        log.removeHandler(handler)
    assert seen == ["queue redis://:***@h:1/0 down"]
