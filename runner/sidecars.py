"""Telling sidecars to quit as the runner exits (MIGRATE_QUIT_URLS).

Without Kubernetes native sidecars (init containers with `restartPolicy: Always`), a
Job's pod completes only once every container has stopped: an Istio proxy or a Cloud
SQL Auth Proxy beside the runner would keep it running long after the runner is done.
Both stop on a POST to their `/quitquitquit`. The POSTs go out together and get a few
seconds in all, so a dead sidecar never holds the pod up, and a failure is a warning:
the exit code stays the one that says what happened to the database.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from urllib.parse import unquote, urlsplit, urlunsplit

from . import log
from .errors import Interrupted

logger = logging.getLogger("runner")

# Seconds for every POST together: they run side by side, so two dead sidecars cost no more than one.
BUDGET = 3.0


def stop(urls: list[str], budget: float = BUDGET) -> None:
    """POST once to each URL, giving them `budget` seconds in all; never raises."""
    if not urls:
        return
    # env.py may have replaced the handlers: these lines must show like the summary after them.
    log.restore()
    for url in urls:
        log.add_secret(unquote(urlsplit(url).password or ""))
    answers: dict[int, str] = {}
    deadline = time.monotonic() + budget
    threads = [threading.Thread(target=_post, args=(url, budget, answers, i), name="quit-sidecar", daemon=True)
               for i, url in enumerate(urls)]
    for thread in threads:
        thread.start()
    unanswered = f"no answer within {budget:g}s"
    try:
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    except Interrupted as e:
        # A second signal: the run is over already, stop waiting rather than lose the summary.
        unanswered = f"no answer before {e}"
    for i, url in enumerate(urls):
        answer = answers.get(i, unanswered)
        if answer.startswith("HTTP 2"):
            logger.info("sidecar told to quit: %s (%s)", shown(url), answer, extra={"quit_url": shown(url)})
        else:
            logger.warning("sidecar not told to quit: %s: %s (the exit code is unchanged)", shown(url), answer,
                           extra={"quit_url": shown(url)})


def _post(url: str, timeout: float, answers: dict[int, str], index: int) -> None:
    # Imported here: urllib.request (http.client, email, ssl) would add ~8 ms to every start.
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        # A redirect is not a sidecar quitting: it is reported as the non-2xx answer it is.
        def redirect_request(self, *args, **kwargs):
            return None

    # No proxy from http_proxy/HTTPS_PROXY: the sidecars are in the pod, a proxy cannot reach them.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect)
    try:
        with opener.open(_request(url), timeout=timeout) as response:
            answers[index] = f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        answers[index] = f"HTTP {e.code} {e.reason}".rstrip()
    except urllib.error.URLError as e:
        answers[index] = _reason(e.reason)
    except Exception as e:  # a read timeout, a connection reset: any failure is a warning, nothing more
        answers[index] = _reason(e)


def _request(url: str):
    """A POST without a body; user info, which urllib would take for part of the host, as Basic authentication."""
    import urllib.request

    parts = urlsplit(url)
    request = urllib.request.Request(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], fragment="")),
                                     data=b"", method="POST", headers={"User-Agent": "migration-runner"})
    if "@" in parts.netloc:
        credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    return request


def _reason(error: BaseException | str) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def shown(url: str) -> str:
    """The URL as logged: user info and query (where a token may be) masked."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{log.MASK}@{host}" if "@" in parts.netloc else host
    return urlunsplit((parts.scheme, netloc, parts.path, log.MASK if parts.query else "", ""))
