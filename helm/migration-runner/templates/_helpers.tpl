{{/*
Helpers of the migration-runner chart. Every helper takes a chart context (the
chart's own root ".", or a parent chart's (index .Subcharts "<name or alias>")),
so that they also work when a parent chart includes "migration-runner.initContainer".
*/}}

{{/* The chart name. */}}
{{- define "migration-runner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name: release name + chart name, at most 63 characters. */}}
{{- define "migration-runner.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "migration-runner.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "migration-runner.labels" -}}
helm.sh/chart: {{ include "migration-runner.chart" . }}
{{ include "migration-runner.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: migration
{{- end }}

{{/* Labels that identify the runner's pods. */}}
{{- define "migration-runner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "migration-runner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The image reference: repository and digest, or repository and tag (appVersion by default). */}}
{{- define "migration-runner.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The ServiceAccount the Job runs as. */}}
{{- define "migration-runner.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "migration-runner.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the database URL, and its key. */}}
{{- define "migration-runner.secretName" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecret }}
{{- else }}
{{- printf "%s-database" (include "migration-runner.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{- define "migration-runner.secretKey" -}}
{{- if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}

{{/* The ConfigMap holding the migrations. */}}
{{- define "migration-runner.configMapName" -}}
{{- if .Values.migrations.existingConfigMap }}
{{- .Values.migrations.existingConfigMap }}
{{- else }}
{{- printf "%s-migrations" (include "migration-runner.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* A ConfigMap key for a relative file path (keys cannot hold "/"). */}}
{{- define "migration-runner.fileKey" -}}
{{- regexReplaceAll "[^-._a-zA-Z0-9]" . "__" }}
{{- end }}

{{/*
Refuse values that cannot work, with a message saying what to set. The schema
catches unknown keys and wrong types; these are the rules across keys.
*/}}
{{- define "migration-runner.validate" -}}
{{- if not (or .Values.database.existingSecret .Values.database.url) }}
{{- fail "migration-runner: set database.existingSecret (a Secret holding the URL under database.existingSecretKey) or database.url (rendered into a Secret); the runner has no database to migrate" }}
{{- end }}
{{- if and .Values.database.existingSecret (not .Values.database.existingSecretKey) }}
{{- fail "migration-runner: database.existingSecretKey is empty; name the key of the URL in database.existingSecret" }}
{{- end }}
{{- if eq .Values.migrations.source "configMap" }}
{{- if not (or .Values.migrations.files .Values.migrations.existingConfigMap) }}
{{- fail "migration-runner: migrations.source is configMap but neither migrations.files nor migrations.existingConfigMap is set" }}
{{- end }}
{{- if and .Values.migrations.files (not .Values.migrations.existingConfigMap) (not (hasKey .Values.migrations.files "alembic.ini")) (not .Values.migrations.alembicConfig) }}
{{- fail "migration-runner: migrations.files has no \"alembic.ini\"; add it or set migrations.alembicConfig" }}
{{- end }}
{{- end }}
{{- if and (eq .Values.migrations.source "volume") (not .Values.migrations.volume) }}
{{- fail "migration-runner: migrations.source is volume but migrations.volume is empty; give a volume source such as {persistentVolumeClaim: {claimName: NAME}}" }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if has .name (list "DATABASE_URL" "DATABASE_URL_FILE") }}
{{- fail (printf "migration-runner: extraEnv must not set %s; the URL comes from database.existingSecret or database.url as a mounted file" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Annotations of the resources the Job needs before it starts (Secret, ConfigMap,
ServiceAccount). A pre-install hook runs before the chart's ordinary resources
exist, so in mode hook they are hooks themselves with a lower weight, and in
mode argocd PreSync hooks in an earlier sync wave. In mode job, or without the
Job, they are ordinary resources.
*/}}
{{- define "migration-runner.preJobAnnotations" -}}
{{- if .Values.job.enabled }}
{{- if eq .Values.mode "hook" }}
helm.sh/hook: {{ .Values.hook.events | quote }}
helm.sh/hook-weight: {{ sub (int .Values.hook.weight) 1 | quote }}
helm.sh/hook-delete-policy: {{ .Values.hook.deletePolicy | quote }}
{{- else if eq .Values.mode "argocd" }}
argocd.argoproj.io/hook: {{ .Values.argocd.hook | quote }}
argocd.argoproj.io/sync-wave: {{ sub (int .Values.argocd.syncWave) 1 | quote }}
argocd.argoproj.io/hook-delete-policy: {{ .Values.argocd.deletePolicy | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Annotations of the Job itself, per mode. */}}
{{- define "migration-runner.jobAnnotations" -}}
{{- if eq .Values.mode "hook" }}
helm.sh/hook: {{ .Values.hook.events | quote }}
helm.sh/hook-weight: {{ int .Values.hook.weight | quote }}
helm.sh/hook-delete-policy: {{ .Values.hook.deletePolicy | quote }}
{{- else if eq .Values.mode "argocd" }}
argocd.argoproj.io/hook: {{ .Values.argocd.hook | quote }}
argocd.argoproj.io/sync-wave: {{ int .Values.argocd.syncWave | quote }}
argocd.argoproj.io/hook-delete-policy: {{ .Values.argocd.deletePolicy | quote }}
{{- end }}
{{- with .Values.job.annotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The Job's name: fixed for hooks; with a hash of the image and settings in mode job. */}}
{{- define "migration-runner.jobName" -}}
{{- $base := include "migration-runner.fullname" . | trunc 54 | trimSuffix "-" }}
{{- if eq .Values.mode "job" }}
{{- printf "%s-%s" $base (include "migration-runner.settingsHash" .) }}
{{- else }}
{{- $base }}
{{- end }}
{{- end }}

{{/* A short hash of everything that makes one migration run differ from another. */}}
{{- define "migration-runner.settingsHash" -}}
{{- $parts := list (include "migration-runner.container" (dict "context" .)) (toJson .Values.database) (toJson .Values.migrations) }}
{{- join "\n" $parts | sha256sum | trunc 8 }}
{{- end }}

{{/* Environment variables: each runner setting from values (the names are the runner's, see runner/settings.py). */}}
{{- define "migration-runner.env" -}}
{{- $v := .Values -}}
- name: DATABASE_URL_FILE
  value: {{ printf "%s/url" (trimSuffix "/" $v.database.mountPath) | quote }}
{{- if eq $v.migrations.source "image" }}
{{- /* Recorded with the lineage: an older image refused on this database names the image to downgrade with
(only when the image holds the migrations; otherwise it would name an image without them). */}}
- name: MIGRATE_IMAGE
  value: {{ include "migration-runner.image" . | quote }}
{{- end }}
{{- if $v.migrations.alembicConfig }}
- name: ALEMBIC_CONFIG
  value: {{ $v.migrations.alembicConfig | quote }}
{{- else if ne $v.migrations.source "image" }}
- name: ALEMBIC_CONFIG
  value: {{ printf "%s/alembic.ini" (trimSuffix "/" $v.migrations.mountPath) | quote }}
{{- end }}
{{- $variables := dict
  "waitTimeout" "MIGRATE_WAIT_TIMEOUT"
  "lockTimeout" "MIGRATE_LOCK_TIMEOUT"
  "lockKey" "MIGRATE_LOCK_KEY"
  "baselineRevision" "MIGRATE_BASELINE_REVISION"
  "allowMultipleHeads" "MIGRATE_ALLOW_MULTIPLE_HEADS"
  "allowAhead" "MIGRATE_ALLOW_AHEAD"
  "versionTable" "MIGRATE_VERSION_TABLE"
  "versionTableSchema" "MIGRATE_VERSION_TABLE_SCHEMA"
  "applicationName" "MIGRATE_APPLICATION_NAME"
  "connectionCheckInterval" "MIGRATE_CONNECTION_CHECK_INTERVAL"
  "statementTimeout" "MIGRATE_STATEMENT_TIMEOUT"
  "ddlLockTimeout" "MIGRATE_DDL_LOCK_TIMEOUT"
  "ddlLockRetries" "MIGRATE_DDL_LOCK_RETRIES"
  "terminationLog" "MIGRATE_TERMINATION_LOG"
  "logFormat" "MIGRATE_LOG_FORMAT"
  "logLevel" "MIGRATE_LOG_LEVEL"
  "progressInterval" "MIGRATE_PROGRESS_INTERVAL"
  "alembicSection" "ALEMBIC_SECTION"
  "alembicXArgs" "ALEMBIC_X_ARGS" }}
{{- range $key, $name := $variables }}
{{- $value := index $v.config $key }}
{{- if and (not (kindIs "invalid" $value)) (ne (toString $value) "") }}
{{- if kindIs "float64" $value }}
{{- if eq $value (floor $value) }}{{ $value = int64 $value }}{{ end }}
{{- end }}
- name: {{ $name }}
  value: {{ toString $value | quote }}
{{- end }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volume mounts of the runner container. */}}
{{- define "migration-runner.volumeMounts" -}}
- name: migration-runner-database
  mountPath: {{ .Values.database.mountPath }}
  readOnly: true
- name: migration-runner-tmp
  mountPath: /tmp
{{- if ne .Values.migrations.source "image" }}
- name: migration-runner-migrations
  mountPath: {{ .Values.migrations.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
The volumes the runner container mounts. Public: a parent chart that includes
"migration-runner.initContainer" adds these to its pod's volumes:
  volumes:
    {{- include "migration-runner.volumes" (dict "chart" (index .Subcharts "migrationRunner")) | nindent 4 }}
*/}}
{{- define "migration-runner.volumes" -}}
{{- $ctx := .chart | default .context -}}
- name: migration-runner-database
  secret:
    secretName: {{ include "migration-runner.secretName" $ctx }}
    defaultMode: {{ .defaultMode | default 0444 }}
    items:
      - key: {{ include "migration-runner.secretKey" $ctx }}
        path: url
- name: migration-runner-tmp
  emptyDir:
    sizeLimit: {{ $ctx.Values.tmpSizeLimit }}
{{- if eq $ctx.Values.migrations.source "configMap" }}
- name: migration-runner-migrations
  configMap:
    name: {{ include "migration-runner.configMapName" $ctx }}
    {{- if $ctx.Values.migrations.existingConfigMap }}
    {{- with $ctx.Values.migrations.existingConfigMapItems }}
    items:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- else }}
    items:
      {{- range $path, $_ := $ctx.Values.migrations.files }}
      - key: {{ include "migration-runner.fileKey" $path }}
        path: {{ $path | quote }}
      {{- end }}
    {{- end }}
{{- else if eq $ctx.Values.migrations.source "volume" }}
- name: migration-runner-migrations
  {{- toYaml $ctx.Values.migrations.volume | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The runner container. Arguments (a dict):
  context  the chart context (required)
  name     the container name (default "migration-runner")
  command  overrides values "command" (a list; empty keeps the image's ENTRYPOINT)
  args     overrides values "args" (a list, e.g. (list "wait"))
*/}}
{{- define "migration-runner.container" -}}
{{- $ctx := .context }}
{{- $v := $ctx.Values }}
{{- $command := hasKey . "command" | ternary .command $v.command }}
{{- $args := hasKey . "args" | ternary .args $v.args -}}
- name: {{ .name | default "migration-runner" }}
  image: {{ include "migration-runner.image" $ctx | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- with $command }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    {{- include "migration-runner.env" $ctx | trim | nindent 4 }}
  {{- with $v.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    {{- include "migration-runner.volumeMounts" $ctx | nindent 4 }}
  terminationMessagePolicy: FallbackToLogsOnError
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
The runner as an init container of an application's own pods. Public API for
parent charts that depend on this chart (the alias "migrationRunner" below is
the parent's choice):

  initContainers:
    {{- include "migration-runner.initContainer" (dict "chart" (index .Subcharts "migrationRunner")) | nindent 4 }}
  volumes:
    {{- include "migration-runner.volumes" (dict "chart" (index .Subcharts "migrationRunner")) | nindent 4 }}

Optional keys of the dict: "name" (container name, default "migration-runner"),
"command" and "args" (lists overriding the values' command and args, e.g.
(list "wait") for a read-only wait for the heads).
*/}}
{{- define "migration-runner.initContainer" -}}
{{- $ctx := .chart }}
{{- if not $ctx }}
{{- fail "migration-runner.initContainer: pass (dict \"chart\" (index .Subcharts \"<dependency name or alias>\"))" }}
{{- end }}
{{- include "migration-runner.validate" $ctx }}
{{- $params := dict "context" $ctx "name" (.name | default "migration-runner") }}
{{- if hasKey . "command" }}{{ $_ := set $params "command" .command }}{{ end }}
{{- if hasKey . "args" }}{{ $_ := set $params "args" .args }}{{ end }}
{{- include "migration-runner.container" $params | trim }}
{{- end }}

{{/*
A read-only init container for an application's pods that waits until the
database is at the heads (`migration-runner wait`), for when the migration
itself runs as this chart's Job: the application never starts against an old
schema while the Job is still running. Same dict as initContainer.
*/}}
{{- define "migration-runner.waitContainer" -}}
{{- $params := merge (dict "name" "wait-for-migrations" "args" (list "wait")) . }}
{{- include "migration-runner.initContainer" $params }}
{{- end }}
