"""Pure logic: backoff, error outcomes, report transitions, sender and status-mail policy."""

from __future__ import annotations

from datetime import UTC, datetime

from mailfax import reasons
from mailfax.config import DispatchSettings, SenderPolicySettings
from mailfax.model import FINAL_STATES, TRANSITIONS, JobState, can_transition
from mailfax.outbound.dispatch import outcome_of_error, retry_delay
from mailfax.outbound.notify import format_duration
from mailfax.outbound.tracking import transition_for
from mailfax.providers.base import ProviderError, StatusReport
from mailfax.store.base import Job
from mailfax.trust.policy import check_sender, status_mail_allowed

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def test_final_states_have_no_way_out() -> None:
    for state in FINAL_STATES:
        assert TRANSITIONS[state] == frozenset()
    assert can_transition(JobState.QUEUED, JobState.SUBMITTED)
    assert not can_transition(JobState.DELIVERED, JobState.FAILED)


def test_retry_delay_grows_exponentially_with_jitter_and_a_ceiling() -> None:
    assert retry_delay(1, 30, 3600, rand=lambda: 1.0) == 30
    assert retry_delay(3, 30, 3600, rand=lambda: 1.0) == 120
    assert retry_delay(3, 30, 3600, rand=lambda: 0.0) == 60
    assert retry_delay(20, 30, 3600, rand=lambda: 1.0) == 3600


def test_transient_error_retries_until_the_attempts_run_out() -> None:
    settings = DispatchSettings(max_attempts=3, retry_initial_seconds=10)
    error = ProviderError(reasons.reason("provider_unavailable"), transient=True)
    retry = outcome_of_error(error, 1, settings, NOW)
    assert retry.state == JobState.RETRYING
    assert retry.next_attempt_at is not None and retry.next_attempt_at > NOW
    final = outcome_of_error(error, 3, settings, NOW)
    assert final.state == JobState.FAILED
    assert "gave up after 3 attempts" in final.detail


def test_retry_after_from_the_provider_wins() -> None:
    error = ProviderError(reasons.reason("provider_unavailable"), transient=True, retry_after=90)
    retry = outcome_of_error(error, 1, DispatchSettings(), NOW)
    assert retry.next_attempt_at == NOW.replace(minute=1, second=30)


def test_permanent_error_fails_at_once() -> None:
    error = ProviderError(reasons.reason("invalid_number"), transient=False)
    outcome = outcome_of_error(error, 1, DispatchSettings(), NOW)
    assert outcome.state == JobState.FAILED
    assert outcome.reason is not None and outcome.reason.code == "invalid_number"


def _job(state: JobState) -> Job:
    return Job(id="j", mail_id="m", account="a", number="+4930123456", state=state, pages=1,
               sender="s", created=NOW, updated=NOW, attempts=1, next_attempt_at=None,
               provider_job_id="P", reason=None, duration_seconds=None, remote_id=None,
               options={}, cancel_requested=False, acknowledged=False)


def test_report_without_change_is_no_transition() -> None:
    assert transition_for(_job(JobState.SUBMITTED), StatusReport(JobState.SUBMITTED)) is None


def test_delivered_report_carries_its_figures_and_is_mailed() -> None:
    report = StatusReport(JobState.DELIVERED, pages=2, duration_seconds=41, remote_id="R")
    transition = transition_for(_job(JobState.SENDING), report)
    assert transition is not None
    assert (transition.pages, transition.duration_seconds, transition.notify) == (2, 41, True)


def test_failed_report_with_no_pages_sent_keeps_the_jobs_page_count() -> None:
    report = StatusReport(JobState.FAILED, pages=0, reason=reasons.reason("no_answer"))
    transition = transition_for(_job(JobState.SENDING), report)
    assert transition is not None
    assert transition.pages is None  # the store keeps the pages of the documents
    assert transition.notify


def test_sending_report_is_recorded_but_not_mailed() -> None:
    transition = transition_for(_job(JobState.SUBMITTED), StatusReport(JobState.SENDING))
    assert transition is not None and not transition.notify


def test_only_trusted_networks_may_send_by_default() -> None:
    policy = SenderPolicySettings()
    assert check_sender("a@b.c", "127.0.0.1", policy).allowed
    assert check_sender("a@b.c", "::1", policy).allowed
    assert check_sender("a@b.c", "::ffff:127.0.0.1", policy).allowed
    assert not check_sender("a@b.c", "192.0.2.1", policy).allowed
    assert not check_sender("a@b.c", None, policy).allowed


def test_listed_senders_and_domains() -> None:
    policy = SenderPolicySettings(allowed_addresses=["boss@corp.example"],
                                  allowed_domains=["office.example"])
    assert check_sender("Boss@Corp.Example", "127.0.0.1", policy).allowed
    assert check_sender("anyone@office.example", "127.0.0.1", policy).allowed
    assert not check_sender("eve@evil.example", "127.0.0.1", policy).allowed
    assert not check_sender("", "127.0.0.1", policy).allowed


def test_no_status_mail_to_bounces_daemons_or_automatic_mail() -> None:
    assert status_mail_allowed("alice@example.org", None, None)
    assert status_mail_allowed("alice@example.org", "no", None)
    assert not status_mail_allowed("", None, None)
    assert not status_mail_allowed("MAILER-DAEMON@example.org", None, None)
    assert not status_mail_allowed("alice@example.org", "auto-replied", None)
    assert not status_mail_allowed("alice@example.org", None, "bulk")
    assert not status_mail_allowed("list-request@example.org", None, None)


def test_duration_is_minutes_and_seconds() -> None:
    assert format_duration(41) == "0:41"
    assert format_duration(125.4) == "2:05"
    assert format_duration(None) == ""
