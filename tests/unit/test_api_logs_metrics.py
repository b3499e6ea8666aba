"""Firecracker-style log lines and metrics lines."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest

from ember.api.logs import FirecrackerFormatter, LogSetup, local_timestamp, parse_level
from ember.api.metrics import ApiCounters, MetricsSink
from ember.errors import ConfigError

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9} \[(?P<tag>[^\]]+)\] (?P<msg>.*)$")


def _record(msg="hello", level=logging.INFO, thread="MainThread"):
    record = logging.LogRecord("ember.x", level, "/somewhere/ember/api/server.py", 42, msg, (), None)
    record.threadName = thread
    return record


def test_format_plain_level_and_origin():
    plain = FirecrackerFormatter("vm1").format(_record())
    match = LINE.match(plain)
    assert match and match["tag"] == "vm1:main" and match["msg"] == "hello"
    full = FirecrackerFormatter("vm1", show_level=True, show_origin=True).format(
        _record(level=logging.WARNING, thread="fc_api"))
    assert LINE.match(full)["tag"] == "vm1:fc_api:WARN:/somewhere/ember/api/server.py:42"


def test_timestamp_has_nanoseconds():
    assert local_timestamp(1_700_000_000_123_456_789).endswith(".123456789")


@pytest.mark.parametrize("name, level", [("Error", logging.ERROR), ("warning", logging.WARNING),
                                         ("WARN", logging.WARNING), ("Info", logging.INFO),
                                         ("DEBUG", logging.DEBUG), ("Trace", 5)])
def test_levels(name, level):
    assert parse_level(name) == level


def test_bad_level_is_one_line_error():
    with pytest.raises(ConfigError, match="invalid log level 'Loud'"):
        parse_level("Loud")


def test_log_setup_writes_file_and_filters_level(tmp_path):
    path = tmp_path / "fc.log"
    setup = LogSetup("my-vm")
    try:
        setup.configure(str(path), "Warning", show_level=True)
        logger = logging.getLogger("ember.test")
        logger.info("hidden")
        logger.warning("shown %d", 7)
        lines = path.read_text().splitlines()
        assert len(lines) == 1
        assert LINE.match(lines[0])["tag"] == "my-vm:main:WARN" and lines[0].endswith("shown 7")
    finally:
        setup.close()


def test_log_setup_works_with_a_fifo_without_reader(tmp_path):
    import os
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    setup = LogSetup()
    try:
        setup.configure(str(fifo), "Info")  # must not block
        logging.getLogger("ember.test").info("into the pipe")
        with open(fifo, "rb", buffering=0) as reader:
            assert b"into the pipe" in reader.read(4096)
    finally:
        setup.close()


def test_counters_are_deltas():
    counters = ApiCounters()
    counters.inc("put_api_requests", "drive_count")
    counters.inc("put_api_requests", "drive_count")
    assert counters.take() == {"put_api_requests": {"drive_count": 2}}
    assert counters.take() == {}


def test_metrics_sink_flush_and_periodic(tmp_path):
    path = tmp_path / "fc.metrics"
    seen = []

    def source():
        seen.append(1)
        return {"utc_timestamp_ms": len(seen)}

    sink = MetricsSink(source, interval=0.05)
    assert sink.flush() is False  # not configured: nothing written, no error
    sink.configure(str(path))
    assert sink.flush() is True
    time.sleep(0.3)
    sink.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) >= 3 and lines[0] == {"utc_timestamp_ms": 1}


def test_metrics_bad_path():
    sink = MetricsSink(dict)
    with pytest.raises(ConfigError, match="metrics"):
        sink.configure("/no/such/dir/metrics")
