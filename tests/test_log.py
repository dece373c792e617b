import json
import logging
import subprocess
import sys
import textwrap

from runner import log


def test_redact_masks_registered_secrets_in_every_encoding():
    secret = "p%w@rd:/#? y"
    log.add_secret(secret)
    for text in (secret, "p%25w%40rd%3A%2F%23%3F%20y", "p%25w%40rd%3A%2F%23%3F+y"):
        assert secret not in log.redact(f"before {text} after") and "***" in log.redact(f"before {text} after")


def test_redact_masks_url_credentials_and_password_parameters_it_was_never_told_about():
    assert log.redact("postgresql://bob:hunter 2@db/x") == "postgresql://bob:***@db/x"
    assert log.redact("dbname=x password=hunter2 host=h") == "dbname=x password=*** host=h"
    assert log.redact("postgresql://bob@db/x?sslmode=require&password=hunter2") == \
        "postgresql://bob@db/x?sslmode=require&password=***"


def test_json_formatter_masks_values_but_not_keys():
    log.add_secret("evel")  # inside the key "level"
    record = logging.makeLogRecord({"msg": "secret evel here", "levelname": "INFO", "name": "runner",
                                    "holders": [{"query": "evel"}]})
    entry = json.loads(log.JsonFormatter().format(record))
    assert entry["event"] == "secret *** here" and entry["holders"] == [{"query": "***"}]
    assert {"time", "level", "logger", "event"} <= set(entry) and entry["level"] == "info"


def test_secrets_are_masked_as_whole_tokens_and_short_ones_only_where_they_are_passwords():
    log.add_secret("gradeA")
    log.add_secret("up")
    assert log.redact("upgrade to gradeA, not upgradeAbc") == "upgrade to ***, not upgradeAbc"
    assert log.redact("postgresql://app:up@db/shop and password=up") == "postgresql://app:***@db/shop and password=***"
    assert log.redact("/srv/up/alembic.ini") == "/srv/up/alembic.ini"


SCRIPT = textwrap.dedent("""
    import logging, logging.config, sys
    from runner import log
    log.setup("json", "INFO")
    log.add_secret("hunter2")
    logging.config.fileConfig(sys.argv[1])   # what alembic's generic env.py does
    logging.getLogger("alembic.runtime.migration").info("Running upgrade  -> a, x")
    logging.getLogger("runner").info("still ours, password hunter2")
    print("a stray print")
    print("to stderr", file=sys.stderr)
""")


def test_setup_survives_env_py_file_config_and_turns_stray_output_into_json(tmp_path, project):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(project)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    events = [r["event"] for r in records]
    assert events == ["Running upgrade  -> a, x", "still ours, password ***", "a stray print", "to stderr"]
    assert [r["logger"] for r in records][2:] == ["stdout", "stderr"]
