import signal

from runner import errors


def test_exit_codes_are_distinct_and_documented():
    rows = errors.exit_codes()
    codes = [row["code"] for row in rows]
    assert len(codes) == len(set(codes))
    assert {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 130, 143} == set(codes)
    assert all(row["meaning"] for row in rows)


def test_only_transient_failures_are_retryable():
    retryable = {row["code"] for row in errors.exit_codes() if row["retryable"]}
    assert retryable == {3, 4, 9, 130, 143}


def test_every_error_class_has_its_own_code_and_docstring():
    for cls in errors.ERRORS:
        assert issubclass(cls, errors.RunnerError) and cls.__doc__ and cls.exit_code not in (0, 1)


def test_interrupted_is_a_keyboard_interrupt_so_psycopg_cancels_the_statement():
    error = errors.Interrupted(signal.SIGTERM)
    assert isinstance(error, KeyboardInterrupt) and not isinstance(error, Exception)
    assert error.exit_code == 143 and errors.Interrupted(signal.SIGINT).exit_code == 130


def test_markdown_table_has_a_row_per_code():
    table = errors.markdown_table().splitlines()
    assert len(table) == 2 + len(errors.exit_codes())
