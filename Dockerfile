# migration-runner container image.
#
# Build (from the repository root):
#   docker build -t migration-runner .
#   buildah bud -t migration-runner .
#
# Behind a TLS-intercepting proxy, hand the proxy's CA bundle to the builder
# stage only (it is never copied into the final image), either as a build
# secret (Docker/BuildKit, buildah, podman):
#   docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt \
#       --build-arg SSL_CERT_FILE=/run/secrets/ca-bundle -t migration-runner .
# or as a bind mount (buildah, podman):
#   buildah bud -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro \
#       --build-arg SSL_CERT_FILE=/run/host-ca.crt -t migration-runner .
# See docs/container.md.

ARG BASE_IMAGE=debian:trixie-slim

# ---------------------------------------------------------------------------
# builder: Debian's python3 + uv; installs the locked dependencies and the
# project (not editable) into /opt/venv with precompiled bytecode.
# ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

# Optional CA bundle for corporate / TLS-intercepting proxies (builder only):
# the path of a PEM bundle mounted into the build (the optional build secret
# `ca-bundle` lands at /run/secrets/ca-bundle). SSL_CERT_FILE is read by uv
# and, unless they are given, becomes PIP_CERT and REQUESTS_CA_BUNDLE for pip.
# UV_NATIVE_TLS=true makes uv use the system trust store instead.
ARG SSL_CERT_FILE=
ARG PIP_CERT=
ARG REQUESTS_CA_BUNDLE=
ARG UV_NATIVE_TLS=
# uv is installed from the package index with pip (pinned).
ARG UV_VERSION=0.13.9

# libpq5 only so that the import check below loads psycopg as the final stage will.
RUN DEBIAN_FRONTEND=noninteractive apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv binutils libpq5 \
 && rm -rf /var/lib/apt/lists/*

# uv must use the very interpreter the final stage has (Debian's
# /usr/bin/python3): never download a managed Python.
# SOURCE_DATE_EPOCH makes the bytecode hash-checked instead of mtime-checked:
# layer copies do not keep sub-second mtimes, and a timestamp .pyc whose
# source mtime moved is recompiled (or, on a read-only root, recompiled at
# every start). It also makes the project's wheel reproducible.
ENV UV_PYTHON=/usr/bin/python3 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    SOURCE_DATE_EPOCH=315532800 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv

RUN --mount=type=secret,id=ca-bundle,required=false \
    set -eu; \
    if [ -n "${SSL_CERT_FILE:-}" ]; then \
        export PIP_CERT="${PIP_CERT:-$SSL_CERT_FILE}" \
               REQUESTS_CA_BUNDLE="${REQUESTS_CA_BUNDLE:-$SSL_CERT_FILE}"; \
    else \
        unset SSL_CERT_FILE; \
    fi; \
    [ -n "${PIP_CERT:-}" ] || unset PIP_CERT; \
    [ -n "${REQUESTS_CA_BUNDLE:-}" ] || unset REQUESTS_CA_BUNDLE; \
    python3 -m venv /opt/uv; \
    /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"; \
    ln -s /opt/uv/bin/uv /usr/local/bin/uv

WORKDIR /src

# Optional extras: EXTRAS=drivers adds asyncpg, psycopg2 and pg8000 for an env.py that
# builds its own engine with them (about 16 MB more; psycopg 3 serves sync and async alone).
ARG EXTRAS=""

# Dependencies first (cached while only the project's code changes).
COPY pyproject.toml uv.lock ./
RUN --mount=type=secret,id=ca-bundle,required=false \
    set -eu; \
    [ -n "${SSL_CERT_FILE:-}" ] || unset SSL_CERT_FILE; \
    [ -n "${UV_NATIVE_TLS:-}" ] || unset UV_NATIVE_TLS; \
    uv sync --locked --no-dev --no-install-project --no-editable --no-install-package psycopg-binary \
        ${EXTRAS:+--extra "$EXTRAS"}

# Then the project itself, installed as a regular (non-editable) package, and
# a trim of what the runner never loads (each removal says why it is safe).
# psycopg-binary is not installed (`--no-install-package`, the lock stays as it
# is): psycopg then uses its own pure-Python implementation on Debian's libpq5
# (installed in the final stage), instead of the wheel's bundled copies of
# libpq, OpenSSL, Kerberos and LDAP (11 MB, OpenSSL already being in the base;
# libpq5 with its Kerberos and LDAP libraries is 2.6 MB). The C implementation
# only makes adapting values in Python faster: the runner's few queries, and
# migrations whose statements run on the server, do not notice it (a migration
# that moves many rows through Python would).
ARG CHECK_IMPORTS="import psycopg, pydantic_core, markupsafe._speedups, alembic.command, greenlet; \
assert psycopg.pq.__impl__ == 'python', psycopg.pq.__impl__; assert psycopg.pq.version() >= 170000; \
import sqlalchemy.dialects.postgresql.psycopg, sqlalchemy.dialects.sqlite, sqlalchemy.ext.asyncio; \
from sqlalchemy.util._has_cython import HAS_CYEXTENSION; assert HAS_CYEXTENSION, 'SQLAlchemy C extensions'"
COPY README.md ./
COPY runner/ ./runner/
RUN --mount=type=secret,id=ca-bundle,required=false \
    set -eu; \
    [ -n "${SSL_CERT_FILE:-}" ] || unset SSL_CERT_FILE; \
    [ -n "${UV_NATIVE_TLS:-}" ] || unset UV_NATIVE_TLS; \
    uv sync --locked --no-dev --no-editable --no-install-package psycopg-binary ${EXTRAS:+--extra "$EXTRAS"}; \
    test -x /opt/venv/bin/migration-runner; \
    # Debug symbols of the extension modules shipped unstripped (SQLAlchemy's
    # Cython modules, ~8 MB); already-stripped auditwheel libraries are left as they are.
    find /opt/venv -name '*.so*' -type f | while read -r so; do \
        if readelf -S "$so" 2>/dev/null | grep -q '\.symtab'; then strip --strip-unneeded "$so"; fi; \
    done; \
    site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
    # Test-suite helpers, imported only by SQLAlchemy's, Alembic's and greenlet's own tests.
    rm -rf "$site/sqlalchemy/testing" "$site/alembic/testing" "$site/greenlet/tests"; \
    # SQLAlchemy loads a dialect only when a URL names it (its registry imports
    # sqlalchemy.dialects.<name> on demand) and Alembic imports these three only
    # for type checking: a PostgreSQL runner never loads them. SQLite stays: models
    # that env.py imports often give a column a SQLite variant for their own tests.
    rm -rf "$site/sqlalchemy/dialects/mssql" "$site/sqlalchemy/dialects/mysql" "$site/sqlalchemy/dialects/oracle"; \
    # mypy plugins, loaded only by mypy; pydantic.v1, the 1.x API kept for old
    # code, imported by pydantic 2 only for a field type with a v1 validator hook,
    # which the runner's Settings has none of.
    rm -rf "$site/sqlalchemy/ext/mypy" "$site/pydantic/v1" "$site/pydantic/mypy.py"; \
    # Typing stubs and C/Cython sources: nothing imports them.
    find "$site" -type f \( -name '*.pyi' -o -name '*.pxd' -o -name '*.pyx' -o -name '*.c' -o -name '*.cpp' \
        -o -name '*.hpp' -o -name '*.h' \) -delete; \
    # The dependencies as bytecode alone (sourceless .pyc next to where the .py
    # was, which Python imports without a source to check): their sources are
    # those of the locked wheels, and keeping both doubles their size (11 MB).
    # A traceback through them still names file, line and function. The
    # runner's own package keeps its sources and hash-checked bytecode; the
    # templates that `alembic init` copies (never imported) stay as they are.
    find "$site" -path "$site/runner" -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +; \
    /opt/venv/bin/python -m compileall -q -b -j 0 -x '/site-packages/(runner|alembic/templates)/' "$site"; \
    find "$site" \( -path "$site/runner" -o -path "$site/alembic/templates" \) -prune \
        -o -type f -name '*.py' -exec rm -f {} +; \
    /opt/venv/bin/python -c "$CHECK_IMPORTS"

# ---------------------------------------------------------------------------
# final: debian:trixie-slim + Debian's python3 + the virtual environment.
# No compilers, no pip, no uv, no package lists or caches.
# ---------------------------------------------------------------------------
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG UID=10001
ARG GID=10001

LABEL org.opencontainers.image.title="migration-runner" \
      org.opencontainers.image.description="Container entrypoint that brings a PostgreSQL database to the current Alembic heads, safely, before an application starts." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="debian:trixie-slim"

# Like debian:*-slim itself keeps docs and man pages out, keep out what only
# CPython's own test suite and the interactive help() use: the test C modules
# by a dpkg exclude, and (after the install, since python3.13's postinst
# byte-compiles every .py it ships) the test package and pydoc's topics.
RUN printf '%s\n' \
        'path-exclude /usr/lib/python3*/lib-dynload/_test*' \
        'path-exclude /usr/lib/python3*/lib-dynload/_xxtestfuzz*' \
        > /etc/dpkg/dpkg.cfg.d/migration-runner-slim \
 && DEBIAN_FRONTEND=noninteractive apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 libpq5 \
 && rm -rf /usr/lib/python3.*/test /usr/lib/python3.*/pydoc_data \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt/* /var/log/dpkg.log \
 && groupadd --gid "${GID}" migrate \
 && useradd --uid "${UID}" --gid "${GID}" --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin migrate

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ALEMBIC_CONFIG=/app/alembic.ini

# A project's alembic.ini and migrations go here (see examples/derived-image).
WORKDIR /app

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER ${UID}:${GID}

STOPSIGNAL SIGTERM
# Exec form: the runner is PID 1 and receives SIGTERM itself.
ENTRYPOINT ["migration-runner"]
