"""The CLI's one-line messages for Dagster errors a user causes; any other error stays a bug (its traceback)."""

from dagster._core.errors import DagsterHomeNotSetError

from d2m_assets.cli import user_error_message


def test_unset_dagster_home_is_one_sentence_and_other_errors_are_bugs() -> None:
    message = user_error_message(DagsterHomeNotSetError("The environment variable $DAGSTER_HOME is not set."))
    assert message == ("the Dagster instance is not usable: The environment variable $DAGSTER_HOME is not set. "
                       "(set DAGSTER_HOME to a folder)")
    assert user_error_message(KeyError("worker_start")) is None  # a bug: not hidden behind an ImportError
