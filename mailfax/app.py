"""Wiring and lifecycle: the store, the provider accounts, and the loops that meet at the store.

intake → store → dispatcher → providers; tracker → store → notifier → outbox sender.
Each loop is supervised: if it crashes it is logged and restarted, and the others carry on.

Several instances on one PostgreSQL store share the dispatcher's, the notifier's and the
outbox's work through leases in the store. The status tracker and each inbound poller run on
one instance at a time: their loop runs only while this instance holds the store's singleton
lock for it (:meth:`PostgresStore.singleton`), and another instance takes over within seconds
when that instance dies. On SQLite (one instance) they simply run.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import secrets
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

from mailfax.config import ConfigError, ListenAddress, Settings, UserSettings, check_secrets
from mailfax.documents import office
from mailfax.intake.accept_spool import accept_spool_loops
from mailfax.intake.broadcast import lists_problem
from mailfax.intake.readiness_check import ReadinessChecker
from mailfax.intake.service import Intake
from mailfax.intake.smtp import start_listeners, tls_context
from mailfax.providers import PROVIDER_MODULES, provider_module
from mailfax.providers.base import Provider, ProviderContext, StatusReport
from mailfax.store import open_store
from mailfax.store.base import Store
from mailfax.support import systemd
from mailfax.support.failing import RepeatedFailure
from mailfax.trust.policy import exposure_problem
from mailfax.web.metrics import InstrumentedProvider, Metrics

if TYPE_CHECKING:  # aiohttp (0.2 s to import) only when the web endpoint is configured
    from aiohttp import web

    # What only the loops need, imported once the SMTP port accepts (LOOP_MODULES)
    from mailfax.imap.intake import ImapIntake
    from mailfax.inbound.mailer import InboundMailer
    from mailfax.outbound.accounts import AccountHealth
    from mailfax.outbound.notify import Renderer
    from mailfax.outbound.outbox import MailSink
    from mailfax.trust.policy_service import PolicyService

log = logging.getLogger("mailfax")

RESTART_DELAY = 2.0
STEADY_SECONDS = 30.0  # a restarted loop that runs this long is taken to work again
# How long stop() waits for the loops once they are cancelled. A loop that does not end by
# then is a bug; it is named in the log and left, so that a stop still stops.
STOP_SECONDS = 10.0


def load_secret_key(data_dir: Path) -> bytes:
    """The installation's secret for push tokens, made on first start (mode 0600)."""
    path = data_dir / "secret.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key.hex())
        return key


def preflight(settings: Settings) -> None:
    """Every check ``serve`` makes before it starts (``check-config`` makes the same ones):
    ConfigError("refusing to start: …") naming what is wrong."""
    problem = startup_problem(settings)
    if problem:
        raise ConfigError(f"refusing to start: {problem}")


def startup_problem(settings: Settings) -> str | None:
    smtp = settings.smtp
    try:
        check_secrets(settings)
    except ConfigError as error:
        return str(error)
    problem = exposure_problem(
        [ListenAddress(listen).host for listen in
         (*smtp.listen, *smtp.lmtp_listen, *smtp.implicit_tls_listen)],
        settings.senders, any(user.password_hash for user in settings.users.values()),
        smtp.tls_cert is not None)
    if problem:
        return problem
    senders = settings.senders
    if settings.imap_intake is not None and not (
            senders.allowed_addresses or senders.allowed_domains
            or settings.imap_intake.allow_any_sender):
        return ("imap_intake: anyone who can mail the watched mailbox could send faxes; set "
                "senders.allowed_addresses or senders.allowed_domains (or, knowingly, "
                "imap_intake.allow_any_sender = true)")
    problem = _folder_problem("data_dir", settings.data_dir) or lists_problem(settings)
    if problem:
        return problem
    try:
        tls_context(smtp)
    except (OSError, ssl.SSLError) as error:
        return (f"smtp.tls_cert/tls_key ({smtp.tls_cert}, {smtp.tls_key}) cannot be used: "
                f"{error.strerror or error}")
    return None


def _folder_problem(name: str, folder: Path) -> str | None:
    """Why ``folder`` could not be created or written by this user, or None."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{name} {folder} cannot be made: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{name} {folder}: {existing} is not writable for this user"
    return None


def inbound_mailer(settings: Settings) -> InboundMailer:
    from mailfax.inbound.mailer import InboundMailer
    from mailfax.outbound.notify import TEMPLATES_DIR

    inbound = settings.inbound
    return InboundMailer(settings.templates_dir or TEMPLATES_DIR, inbound.from_address,
                         inbound.from_name, inbound.language, inbound.timezone,
                         settings.numbers.default_country, inbound.attach_tiff)


def make_providers(settings: Settings, context_for: Callable[[str], ProviderContext]
                   ) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for name, account in settings.accounts.items():
        module = provider_module(account.provider)
        providers[name] = module.create(context_for(name), account.provider_settings())
    return providers


class Application:
    def __init__(self, settings: Settings, instance: str | None = None):
        self.settings = settings
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.store: Store = open_store(settings.store_url)
        self.metrics = Metrics()
        self.providers: dict[str, Provider] = {}
        self.smtp_servers: list[asyncio.Server] = []
        self.policy_service: PolicyService | None = None
        self.web_runner: web.AppRunner | None = None
        self.health_runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._announcing: set[asyncio.Task[None]] = set()
        self._secret_key = b""
        self._loops_made = False  # the dispatcher and the notifier (made after the port)

    async def start(self) -> None:
        settings = self.settings
        await asyncio.to_thread(preflight, settings)  # reads secret files, TLS keys
        settings.data_dir.mkdir(0o750, parents=True, exist_ok=True)  # data: not for others
        documents = settings.documents
        office.configure(office.OfficeLimits(
            soffice="soffice" if documents.office else "",  # "": refused as not enabled
            timeout=documents.office_timeout_seconds,
            max_concurrent=documents.office_max_concurrent,
            profile_root=settings.data_dir / "office"))
        await self.store.open()
        secret_key = self._secret_key = load_secret_key(settings.data_dir)
        self.intake = Intake(settings, self.store, on_stored=self._jobs_changed,
                             metrics=self.metrics, secret_key=secret_key)
        # documents.readiness: one pool of worker processes, for the checks after the 250
        # ("warn") and before it ("refuse"); started by the checker's loop, after the port.
        self.readiness = ReadinessChecker(self.store, settings, self.intake.pool(),
                                          on_recorded=self._jobs_changed)
        self.intake.readiness_checker = self.readiness
        await asyncio.to_thread(self.intake.broadcast_lists)  # not at the first RCPT
        if settings.policy_service.listen:
            from mailfax.trust.policy_service import PolicyDecider, PolicyService

            address = ListenAddress(settings.policy_service.listen)
            self.policy_service = PolicyService(PolicyDecider(self.intake, secret_key))
            await self.policy_service.start(address.host, address.port)
        self.smtp_servers = await start_listeners(self.intake, settings.smtp,
                                                  _CurrentUsers(self.intake))
        self._warm_up()
        try:
            await self._start_loops(secret_key)
        except BaseException:
            self._close_listeners()
            raise

    async def _start_loops(self, secret_key: bytes) -> None:
        """Everything but the intake, once the SMTP port accepts: the provider accounts, the
        loops (dispatcher, tracker, notifier, outbox, inbound, IMAP) and the web endpoint.
        Their modules (and the adapters' libraries, httpx or zeep) are imported in a worker
        thread meanwhile, so the first clients are greeted; the mails they give are stored,
        and the dispatcher's and notifier's first passes find them."""
        settings = self.settings
        await asyncio.to_thread(_import_all, _loop_modules(settings))
        from mailfax.imap.intake import ImapIntake
        from mailfax.inbound.poller import InboundPoller
        from mailfax.inbound.screening import block_file
        from mailfax.outbound.dispatch import Dispatcher, dispatch_schedule
        from mailfax.outbound.notify import TEMPLATES_DIR, Notifier, Renderer
        from mailfax.outbound.outbox import OutboxSender
        from mailfax.outbound.tracking import Tracker
        from mailfax.store.retention import RetentionLoop

        self.providers = {
            name: InstrumentedProvider(provider, self.metrics)
            for name, provider in make_providers(
                settings, lambda name: self._context(name, secret_key)).items()}
        self.outbox = OutboxSender(self.store, self._sink(),
                                   retry_initial=settings.outbox.retry_initial_seconds,
                                   retry_max=settings.outbox.retry_max_seconds,
                                   owner=self.instance)
        renderer = Renderer(settings.templates_dir or TEMPLATES_DIR)
        self.notifier = Notifier(self.store, settings.notify, renderer,
                                 on_queued=self.outbox.wake,
                                 mails_per_hour=settings.quotas.status_mails_per_hour,
                                 fax_domain=settings.fax_domains[0],
                                 hostname=settings.smtp.hostname, owner=self.instance,
                                 admin_address=(settings.notify.admin_address
                                                or settings.inbound.postmaster),
                                 accounts=settings.accounts, spool=self.intake.spool_folder)
        self.accounts = self._account_health(renderer)
        self.tracker = Tracker(self.store, self.providers, settings.dispatch.status_poll_seconds,
                               on_change=self._jobs_changed, accounts=self.accounts,
                               busy_backoff=settings.dispatch.busy_backoff_seconds,
                               unconfirmed_after=timedelta(
                                   hours=settings.dispatch.unconfirmed_hours),
                               **self._deadlines())
        if isinstance(self.store, AnnouncingStore):
            self.store.on_announced = self.tracker.wake  # ignored where it does not run
        self.dispatcher = Dispatcher(self.store, self.providers, settings.dispatch,
                                     owner=self.instance,
                                     on_submitted=self._after_dispatch,
                                     accounts=self.accounts,
                                     schedule=dispatch_schedule(settings),
                                     spool=self.intake.spool_folder)
        self.accounts.on_resumed = lambda account: self.dispatcher.wake()
        self.intake.wake_outbox = self.outbox.wake
        self._loops_made = True  # from here on a stored mail wakes them

        loops: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("dispatcher", self.dispatcher.run),
            ("tracker", self._singleton("tracker", self.tracker.run)),
            ("notifier", self.notifier.run), ("outbox", self.outbox.run),
            ("account probes", lambda: self.accounts.run(self.providers)),
            ("retention", RetentionLoop(settings, self.store).run),
            ("readiness check", self.readiness.run),
            *accept_spool_loops(self.intake)]
        self.inbound_pollers = {
            name: InboundPoller(name, provider, self.store, settings.inbound,
                                inbound_mailer(settings), settings.numbers.default_country,
                                wake_outbox=self.outbox.wake,
                                block_file=block_file(settings.data_dir),
                                imap_delivery=settings.imap_delivery is not None)
            for name, provider in self.providers.items() if provider.supports_inbound}
        loops += [(f"inbound {name}", self._singleton(f"inbound {name}", poller.run))
                  for name, poller in self.inbound_pollers.items()]
        self.imap_intake: ImapIntake | None = None
        if settings.imap_intake is not None:
            self.imap_intake = ImapIntake(settings, self.intake, self.store,
                                          wake_outbox=self.outbox.wake)
            loops.append(("imap intake", self.imap_intake.run))
        await self._start_web()
        # The leases of the last run are released (a write, with its fsync) before the
        # dispatcher claims any.
        released = await self.store.release_leases(None if self._single_instance() else
                                                   self.instance)
        if released:
            log.info("resuming %d jobs that were being sent when mailfax stopped", released)
        self._prepare_providers()
        for name, loop in loops:
            self._tasks.append(asyncio.create_task(supervise(name, loop), name=name))
        self._log_startup()

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` beside the loops, held until it ends and cancelled at stop."""
        task = asyncio.create_task(work)
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    def _warm_up(self) -> None:
        """Load in a worker thread, once the port accepts, what serving loads lazily and would
        otherwise load on the event loop when the first mail needs it (phonenumbers' country
        names for a refusal: 0.4 s; ReportLab for a cover page: 0.15 s; pikepdf and Pillow for
        the documents, jinja2 for the status mail: 0.15 s), and the Prometheus metrics."""
        self._background(asyncio.to_thread(self._count_accounts))
        self._background(asyncio.to_thread(_import_all, WARM_UP_MODULES))

    def _count_accounts(self) -> None:
        """Every account's ``mailfax_account_paused`` from the start (at 0: a new label's
        value; one an account already paused keeps its 1), so dashboards see each account.
        The first metric looked up makes them all (prometheus_client imported)."""
        for name in self.settings.accounts:
            self.metrics.account_paused.labels(name)

    def apply_settings(self, settings: Settings) -> None:
        """Take reloaded users and policy (:func:`reloaded_settings`): read per mail and per
        login, so open sessions simply see them from their next command."""
        self.settings = settings
        self.intake.settings = settings
        self.intake.check_recipient.cache_clear()
        from mailfax.outbound.dispatch import dispatch_schedule

        self.dispatcher.schedule = dispatch_schedule(settings)  # [accounts.NAME] windows
        self.readiness.settings = settings  # its accounts' providers
        if self.imap_intake is not None:
            self.imap_intake.settings = settings

    def replace_accounts(self, names: Sequence[str]) -> None:
        """New adapters for the accounts ``names`` from the (reloaded) settings, put in place
        of the running ones: the dispatcher, tracker, probes, pushes and inbound pollers take
        them from their next call. The old ones are closed after RETIRE_SECONDS, once the
        calls they are in (a send, a poll) have ended."""
        fresh = make_providers(self.settings.model_copy(update={"accounts": {
            name: self.settings.accounts[name] for name in names}}),
            lambda name: self._context(name, self._secret_key))
        for name, provider in fresh.items():
            retired = self.providers[name]
            self.providers[name] = InstrumentedProvider(provider, self.metrics)
            poller = self.inbound_pollers.get(name)
            if poller is not None:
                poller.provider = self.providers[name]
            self._background(_retire(name, retired))
        self._prepare_providers(names)

    async def _start_web(self) -> None:
        """The push listener (``[web] listen``) and the health listener (``health_listen``);
        without the latter the health checks and metrics are on the push listener."""
        web_settings = self.settings.web
        if not (web_settings.listen or web_settings.health_listen):
            return
        from mailfax.web.server import build_web_app, start_web  # aiohttp: 0.2 s to import

        apart = web_settings.health_listen is not None
        if web_settings.listen:
            address = ListenAddress(web_settings.listen)
            self.web_runner = await start_web(
                build_web_app(self.providers, self.store, self.metrics, self.warnings,
                              self.readiness_problems, health_routes=not apart),
                address.host, address.port)
        if web_settings.health_listen:
            address = ListenAddress(web_settings.health_listen)
            self.health_runner = await start_web(
                build_web_app(self.providers, self.store, self.metrics, self.warnings,
                              self.readiness_problems, push_routes=False),
                address.host, address.port)

    async def readiness_problems(self) -> list[str]:
        """Why ``/readyz`` answers 503: the store or the data dir cannot be written, the
        SMTP listeners are not up, an account is paused (its faxes are only held)."""
        from mailfax.web.health import folder_problem, listener_problem, store_problem

        checks = await asyncio.gather(store_problem(self.store),
                                      folder_problem("data_dir", self.settings.data_dir))
        found = [problem for problem in checks if problem]
        listeners = listener_problem(self.smtp_servers)
        if listeners:
            found.append(listeners)
        return found + self.accounts.describe()

    def _account_health(self, renderer: Renderer) -> AccountHealth:
        """Paused accounts: the admin alert goes through the outbox, like status mails."""
        from mailfax.outbound.accounts import AccountHealth
        from mailfax.outbound.notify import AdminAlerts

        settings = self.settings
        alerts = AdminAlerts(self.store, renderer, settings.notify,
                             settings.notify.admin_address or settings.inbound.postmaster,
                             on_queued=self.outbox.wake)
        return AccountHealth(settings.dispatch.account_probe_seconds,
                             on_paused=alerts.account_paused, metrics=self.metrics)

    def _deadlines(self) -> dict[str, Any]:
        """The tracker's deadlines: per account, else dispatch.max_tracking_hours."""
        dispatch = self.settings.dispatch
        metrics = self.metrics  # its metrics are made after the port accepts (_warm_up)
        return {"deadlines": {name: timedelta(hours=account.max_tracking_hours)
                              for name, account in self.settings.accounts.items()
                              if account.max_tracking_hours is not None},
                "default_deadline": timedelta(hours=dispatch.max_tracking_hours),
                "lifetime": dispatch.max_age,
                "on_deadline": lambda account: metrics.jobs_expired.labels(
                    account, "tracking_deadline").inc()}

    def warnings(self) -> list[str]:
        """What /readyz reports below "ready": reconstructed WSDLs (paused accounts are
        problems: :meth:`readiness_problems`)."""
        found: list[str] = []
        for provider in self.providers.values():
            found += provider.warnings()
        return found

    def _prepare_providers(self, names: Sequence[str] | None = None) -> None:
        """Let providers load what they need (FAX.de: its WSDL) in the background, and warn
        at once about what they found."""
        for name, provider in self.providers.items():
            if names is not None and name not in names:
                continue
            prepare = getattr(provider, "prepare", None)
            if callable(prepare):
                self._background(self._prepare(name, provider, prepare))

    @staticmethod
    async def _prepare(name: str, provider: Provider,
                       prepare: Callable[[], Awaitable[None]]) -> None:
        try:
            await prepare()
        except Exception as error:  # the first call tries again
            log.warning("account %s: preparing failed: %s", name, error)
            return
        for warning in provider.warnings():
            log.warning("%s", warning)

    def _single_instance(self) -> bool:
        return self.settings.store_url.startswith("sqlite:")

    def _singleton(self, name: str, loop: Callable[[], Awaitable[None]]
                   ) -> Callable[[], Awaitable[None]]:
        """``loop`` run on one instance at a time, if the store can arrange that."""
        if not callable(getattr(self.store, "singleton", None)):
            return loop
        store = cast(SingletonStore, self.store)
        return lambda: run_as_singleton(store, name, loop)

    def _jobs_changed(self) -> None:
        """New jobs were stored (intake), or a job reached a final state (tracker): its
        mail, and its number's line is free again. (Before the loops are made, while the
        port already accepts, their first passes will find the jobs.)"""
        if not self._loops_made:
            return
        self.dispatcher.wake()
        self.notifier.wake()

    def _after_dispatch(self, job_ids: Sequence[str]) -> None:
        self.tracker.wake(job_ids)
        self.notifier.wake()
        if not self.tracker.running and isinstance(self.store, AnnouncingStore):
            # The tracker runs on another instance: it polls these soon too, not only at
            # its next full poll.
            self._background(self._announce(self.store, job_ids))

    @staticmethod
    async def _announce(store: AnnouncingStore, job_ids: Sequence[str]) -> None:
        try:
            await store.announce_submitted(job_ids)
        except Exception as error:  # the tracker's full poll still finds them
            log.warning("announcing %d submitted jobs failed: %s", len(job_ids), error)

    def _context(self, account: str, secret_key: bytes) -> ProviderContext:
        return ProviderContext(
            account=account, data_dir=self.settings.data_dir, push_base_url=self._push_base(
                account), secret_key=secret_key, wake_tracker=self._wake_tracker,
            report_status=self._report_status, emulator_network=self.store,
            get_job=self.store.get_job,
            allow_plain_http=self.settings.accounts[account].allow_plain_http)

    def _push_base(self, account: str) -> str | None:
        web_settings = self.settings.web
        if not web_settings.listen:
            return None
        base = web_settings.public_url or f"http://{web_settings.listen}"
        return f"{base.rstrip('/')}/push/{account}"

    async def _wake_tracker(self, job_ids: Sequence[str]) -> None:
        self.tracker.wake(job_ids)

    async def _report_status(self, reports: dict[str, StatusReport]) -> None:
        await self.tracker.apply_reports(reports)

    def _sink(self) -> MailSink:
        from mailfax.imap.delivery import ImapDeliverySink
        from mailfax.outbound.outbox import MaildirSink, RelaySink

        sink: MailSink
        if self.settings.relay is not None:
            sink = RelaySink(self.settings.relay, self.settings.smtp.hostname)
        else:
            sink = MaildirSink(self.settings.maildir_path)
        if self.settings.imap_delivery is not None:
            sink = ImapDeliverySink(self.settings.imap_delivery, sink, self.store,
                                    self.settings.numbers.default_country,
                                    inbound=self.settings.inbound)
        return sink

    def _log_startup(self) -> None:
        settings = self.settings
        listening = ", ".join(_bound(server) for server in self.smtp_servers)
        log.info("mailfax %s listening for mail on %s", self.instance, listening)
        if self.policy_service is not None and self.policy_service.server is not None:
            log.info("Postfix policy service on %s", _bound(self.policy_service.server))
        log.info("fax domains: %s; default country %s", ", ".join(settings.fax_domains),
                 settings.numbers.default_country)
        log.info("data in %s (store %s)", settings.data_dir.resolve(),
                 redact_url(settings.store_url))
        for name, provider in self.providers.items():
            suffix = " (the bundled emulator: no fax is really sent)" if (
                provider.provider_name == "emulator") else ""
            log.info("account %s: provider %s%s", name, provider.provider_name, suffix)
        if settings.relay is None and settings.imap_delivery is None:
            log.info("outgoing mail written to the Maildir %s (no relay configured)",
                     settings.maildir_path.resolve())
        else:
            log.info("outgoing mail via %s", self.outbox.sink.describe())
        if self.imap_intake is not None:
            log.info("IMAP intake from %s", self.imap_intake.describe())
        for name, poller in self.inbound_pollers.items():
            log.info("polling account %s for received faxes every %g s", name,
                     poller.poll_interval)
            if not settings.inbound.routes and not settings.inbound.default_route:
                log.info("received faxes are mailed to %s (inbound.postmaster; no routes)",
                         settings.inbound.postmaster)
            folder = getattr(self.providers[name], "inbox_folder", None)
            if isinstance(folder, Path):
                log.info("account %s receives the faxes put into %s (or: mailfax emulate "
                         "receive FILE --to NUMBER)", name, folder.resolve())

    def _close_listeners(self) -> None:
        if self.policy_service is not None:
            self.policy_service.close()
        for server in self.smtp_servers:
            server.close()

    async def stop(self) -> None:
        self._close_listeners()
        for server in self.smtp_servers:
            # Newer Pythons wait here for every open session; a client that never leaves
            # (a half-closed TLS connection, a staller) must not keep mailfax from stopping.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await server.wait_closed()
        for runner in (self.web_runner, self.health_runner):
            if runner is not None:
                await runner.cleanup()
        await _cancel_all([*self._tasks, *self._announcing])
        for provider in self.providers.values():
            await provider.close()
        await self.store.close()


@runtime_checkable
class AnnouncingStore(Protocol):
    """A store shared by several instances that can tell them which jobs were submitted."""

    on_announced: Callable[[list[str]], None]

    async def announce_submitted(self, job_ids: Sequence[str]) -> None: ...


class SingletonStore(Protocol):
    def singleton(self, name: str) -> AbstractAsyncContextManager[asyncio.Event]: ...


async def run_as_singleton(store: SingletonStore, name: str,
                           loop: Callable[[], Awaitable[None]]) -> None:
    """Run ``loop`` whenever this instance holds ``name``'s lock; stop it when the lock is
    lost, and wait for it again."""
    while True:
        async with store.singleton(name) as lost:
            work = asyncio.create_task(_await(loop), name=name)
            watch = asyncio.create_task(lost.wait(), name=f"{name} lock")
            try:
                await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (work, watch):
                    task.cancel()
                await asyncio.gather(work, watch, return_exceptions=True)
            if work.done() and not work.cancelled():
                work.result()  # its return ends the loop; its exception goes to supervise()
                return
        log.warning("%s stopped here: its lock was lost; waiting to take it again", name)


# In the order a first mail needs them: its recipients read (phonenumbers), its PDF checked
# (pikepdf), its status mail rendered (jinja2) and sent to the relay (aiosmtplib), images put
# on pages (Pillow), a refusal's country name (phonenumbers' geocoder), a cover page (ReportLab),
# each page rendered for the fax-readiness check (pypdfium2).
WARM_UP_MODULES = ("phonenumbers", "pikepdf", "jinja2", "aiosmtplib", "PIL.Image", "PIL.ImageChops",
                   "PIL.ImageOps", "PIL.ImageSequence", "phonenumbers.geocoder",
                   "mailfax.documents.cover_pdf", "pypdfium2")


# What the loops need and the intake does not: imported in a thread once the port accepts.
LOOP_MODULES = ("mailfax.outbound.dispatch", "mailfax.outbound.tracking",
                "mailfax.outbound.outbox", "mailfax.outbound.notify", "mailfax.store.retention",
                "mailfax.inbound.poller", "mailfax.inbound.mailer", "mailfax.imap.intake",
                "mailfax.imap.delivery", "mailfax.web.health")


def _loop_modules(settings: Settings) -> list[str]:
    """LOOP_MODULES, the configured accounts' adapters, and the web endpoint if there is
    one."""
    web_settings = settings.web
    return [*LOOP_MODULES, *dict.fromkeys(PROVIDER_MODULES.get(account.provider, "")
                                          for account in settings.accounts.values()),
            *(["mailfax.web.server"] if web_settings.listen or web_settings.health_listen
              else [])]


def _import_all(names: Sequence[str]) -> None:
    """Import ``names`` (blocking: callers run it in one worker thread)."""
    for name in names:
        if name:  # an unknown provider: make_providers names it
            importlib.import_module(name)


async def _await(loop: Callable[[], Awaitable[None]]) -> None:
    await loop()


async def _cancel_all(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait for them, at most :data:`STOP_SECONDS`."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, running = await asyncio.wait(tasks, timeout=STOP_SECONDS)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: a loop's last error was logged by supervise()
    if running:
        log.error("stopping without waiting for %s: not ended %.0f s after being cancelled",
                  ", ".join(sorted(task.get_name() for task in running)), STOP_SECONDS)


async def supervise(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run ``loop``, restarting it when it crashes. A loop that crashes again and again logs
    its traceback once, then a count now and then (:class:`RepeatedFailure`); once it has run
    for :data:`STEADY_SECONDS` after a restart it counts as working again."""
    failures = RepeatedFailure(log, name)
    while True:
        task = asyncio.create_task(_await(loop), name=name)
        try:
            if failures.failures:
                done, _ = await asyncio.wait({task}, timeout=STEADY_SECONDS)
                if not done:
                    failures.succeeded()
            await task
            return
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        except Exception:
            failures.failed(f"restarting in {RESTART_DELAY:.0f} s")
            await asyncio.sleep(RESTART_DELAY)


def _bound(server: asyncio.Server) -> str:
    names = []
    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        names.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return ", ".join(names)


def redact_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


# -- serve: systemd readiness and reload -----------------------------------------------------

# What a reload (SIGHUP) takes from the config file; everything else needs a restart.
RELOADED_SECTIONS = ("accounts", "users", "senders", "dial", "quotas")
# How long a replaced provider adapter stays open for the calls it is in (a send's upload).
RETIRE_SECONDS = 120.0


async def _retire(name: str, provider: Provider) -> None:
    await asyncio.sleep(RETIRE_SECONDS)
    try:
        await provider.close()
    except Exception as error:  # closing the old one must not disturb the new one
        log.warning("account %s: closing the replaced adapter failed: %s", name, error)


def changed_accounts(current: Settings, fresh: Settings) -> list[str]:
    """The accounts whose settings ``fresh`` changes. ConfigError for what a reload cannot
    do: add or remove an account, or change its provider (they need a restart)."""
    if set(fresh.accounts) != set(current.accounts):
        added = sorted(set(fresh.accounts) - set(current.accounts))
        removed = sorted(set(current.accounts) - set(fresh.accounts))
        raise ConfigError("accounts added (" + (", ".join(added) or "none") + ") or removed ("
                          + (", ".join(removed) or "none") + "): that needs a restart")
    for name, account in fresh.accounts.items():
        if account.provider != current.accounts[name].provider:
            raise ConfigError(f"accounts.{name}: the provider changed from "
                              f"{current.accounts[name].provider!r} to {account.provider!r}:"
                              " that needs a restart")
    return [name for name, account in fresh.accounts.items()
            if account != current.accounts[name]]


def reloaded_settings(current: Settings, fresh: Settings) -> tuple[Settings, list[str]]:
    """``current`` with ``fresh``'s :data:`RELOADED_SECTIONS`, and the other sections in
    which ``fresh`` differs (they wait for a restart). ConfigError if the result would not
    be allowed to start (a user's unknown account, an open relay)."""
    changed_accounts(current, fresh)
    merged = current.model_copy(update={name: getattr(fresh, name)
                                        for name in RELOADED_SECTIONS})
    for name, user in merged.users.items():
        if user.account is not None and user.account not in current.accounts:
            raise ConfigError(f"users.{name}.account {user.account!r} is not one of the "
                              "running accounts (new accounts need a restart)")
    problem = startup_problem(merged)
    if problem:
        raise ConfigError(problem)
    waiting = [name for name in type(current).model_fields
               if name not in RELOADED_SECTIONS and getattr(current, name) != getattr(fresh, name)]
    return merged, waiting


class _CurrentUsers(Mapping[str, UserSettings]):
    """``[users.*]`` as the intake has them now, so SMTP AUTH sees a reload too."""

    def __init__(self, intake: Intake):
        self.intake = intake

    def __getitem__(self, name: str) -> UserSettings:
        return self.intake.settings.users[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.intake.settings.users)

    def __len__(self) -> int:
        return len(self.intake.settings.users)


async def reload(app: Application, load: Callable[[], Settings]) -> bool:
    """Read the config again (``load``) and apply its users and policy; sessions, listeners
    and jobs carry on. A config that does not load or would not start is logged and the
    running one kept."""
    systemd.notify(*systemd.reloading_fields())
    try:
        fresh = await asyncio.to_thread(load)
        merged, waiting = await asyncio.to_thread(reloaded_settings, app.settings, fresh)
    except Exception as error:  # ConfigError, or anything else: the service carries on
        log.error("reload refused, the running config is kept: %s", error)
        systemd.notify("READY=1", "STATUS=reload refused; running on the previous config")
        return False
    accounts = changed_accounts(app.settings, merged)
    app.apply_settings(merged)
    if accounts:
        app.replace_accounts(accounts)
        log.info("accounts %s: new settings in use", ", ".join(accounts))
    log.info("config reloaded: %s (%d users)", ", ".join(RELOADED_SECTIONS),
             len(merged.users))
    if waiting:
        log.warning("config changes in %s take effect at the next restart",
                    ", ".join(waiting))
    systemd.notify("READY=1", "STATUS=config reloaded")
    return True


async def serve(settings: Settings, stop: asyncio.Event | None = None,
                load: Callable[[], Settings] | None = None) -> None:
    """Run until ``stop``. Under systemd (``Type=notify``) READY=1 is sent once the SMTP
    listeners accept, STOPPING=1 when stopping. With ``load``, SIGHUP reloads the config."""
    app = Application(settings)
    await app.start()
    reloads: set[asyncio.Task[bool]] = set()
    loop = asyncio.get_running_loop()
    if load is not None:
        def on_hangup() -> None:
            task = loop.create_task(reload(app, load), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    systemd.notify("READY=1", f"STATUS=listening on {', '.join(map(_bound, app.smtp_servers))}")
    try:
        await (stop.wait() if stop else asyncio.Event().wait())
    finally:
        systemd.notify("STOPPING=1")
        if load is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        for task in reloads:
            task.cancel()
        await app.stop()
