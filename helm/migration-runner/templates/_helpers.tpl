{{/*
Helpers of the migration-runner chart. Every helper takes a chart context (the
chart's own root ".", or a parent chart's (index .Subcharts "<name or alias>")),
so that they also work when a parent chart includes "migration-runner.initContainer".
*/}}

{{/*
A name made valid as an RFC 1123 label (what Kubernetes requires of most object
names and of label values): camelCase split with "-" ("migrationRunner" ->
"migration-runner"), lower case, every other character than a-z, 0-9 and "-"
replaced with "-", at most .max characters (default 63), no "-" at either end.
A name that must be cut keeps a short hash of the whole name ("<start>-<8 hex
digits>"), so that two long names that share their first characters (two
aliases of this chart under a long release name) stay distinct.
Arguments (a dict): name, max.
*/}}
{{- define "migration-runner.dnsLabel" -}}
{{- $max := int (.max | default 63) }}
{{- $name := regexReplaceAll "([a-z0-9])([A-Z])" (include "migration-runner.string" .name) "${1}-${2}" | lower }}
{{- $name = regexReplaceAll "[^a-z0-9-]+" $name "-" | trimAll "-" }}
{{- if gt (len $name) $max }}
{{- $hash := $name | sha256sum | trunc 8 }}
{{- $name = printf "%s-%s" ($name | trunc (int (sub $max 9)) | trimAll "-") $hash | trimAll "-" }}
{{- end }}
{{- $name }}
{{- end }}

{{/*
A scalar value as a string, numbers without an exponent: Helm reads every number
of the values as a float, and 20240101 would otherwise print as 2.0240101e+07.
*/}}
{{- define "migration-runner.string" -}}
{{- $value := . }}
{{- if kindIs "invalid" $value }}
{{- else if and (kindIs "float64" $value) (eq $value (floor $value)) }}
{{- int64 $value | toString }}
{{- else }}
{{- toString $value }}
{{- end }}
{{- end }}

{{/* The chart name (the alias, under a parent that gives one), as an RFC 1123 label. */}}
{{- define "migration-runner.name" -}}
{{- $name := include "migration-runner.dnsLabel" (dict "name" (default .Chart.Name .Values.nameOverride)) }}
{{- if not $name }}
{{- fail "migration-runner: nameOverride has no letter or digit to make a resource name of" }}
{{- end }}
{{- $name }}
{{- end }}

{{/*
The full name: release name + chart name, at most 63 characters, an RFC 1123
label whatever the alias, nameOverride or fullnameOverride.
*/}}
{{- define "migration-runner.fullname" -}}
{{- $full := "" }}
{{- if .Values.fullnameOverride }}
{{- $full = .Values.fullnameOverride }}
{{- else }}
{{- $name := include "migration-runner.name" . }}
{{- $release := include "migration-runner.dnsLabel" (dict "name" .Release.Name) }}
{{- if contains $name $release }}
{{- $full = $release }}
{{- else }}
{{- $full = printf "%s-%s" $release $name }}
{{- end }}
{{- end }}
{{- $full = include "migration-runner.dnsLabel" (dict "name" $full) }}
{{- if not $full }}
{{- fail "migration-runner: fullnameOverride has no letter or digit to make a resource name of" }}
{{- end }}
{{- $full }}
{{- end }}

{{/*
The full name and a suffix, at most .max characters together (default 63; the
suffix kept whole, the full name cut with a hash when too long).
*/}}
{{- define "migration-runner.suffixedName" -}}
{{- $max := int (.max | default 63) }}
{{- $base := include "migration-runner.dnsLabel" (dict "name" (include "migration-runner.fullname" .context) "max" (sub (sub $max 1) (len .suffix))) }}
{{- printf "%s-%s" $base .suffix }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "migration-runner.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource (commonLabels included). */}}
{{- define "migration-runner.labels" -}}
{{- $labels := dict
  "helm.sh/chart" (include "migration-runner.chart" .)
  "app.kubernetes.io/managed-by" .Release.Service
  "app.kubernetes.io/component" "migration" }}
{{- if .Chart.AppVersion }}
{{- $_ := set $labels "app.kubernetes.io/version" (.Chart.AppVersion | toString) }}
{{- end }}
{{- $labels = merge (include "migration-runner.selectorLabels" . | fromYaml) $labels (.Values.commonLabels | default dict) }}
{{- toYaml $labels }}
{{- end }}

{{/* Labels that identify the runner's pods. */}}
{{- define "migration-runner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "migration-runner.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end }}

{{/*
The annotations of a resource: the ones given (a dict, e.g. hook annotations),
then commonAnnotations. Arguments (a dict): context, annotations.
*/}}
{{- define "migration-runner.annotations" -}}
{{- $annotations := merge (dict) (.annotations | default dict) (.context.Values.commonAnnotations | default dict) }}
{{- with $annotations }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* The global values, or an empty dict. */}}
{{- define "migration-runner.global" -}}
{{- toYaml (.Values.global | default dict) }}
{{- end }}

{{/*
The image reference: [registry/]repository and digest, or tag (appVersion by
default); global.imageRegistry takes precedence over image.registry.
*/}}
{{- define "migration-runner.image" -}}
{{- $global := include "migration-runner.global" . | fromYaml }}
{{- $registry := $global.imageRegistry | default .Values.image.registry }}
{{- $repository := .Values.image.repository }}
{{- if $registry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" $registry) $repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (include "migration-runner.string" (default .Chart.AppVersion .Values.image.tag)) }}
{{- end }}
{{- end }}

{{/* imagePullSecrets of the pods: global.imagePullSecrets (names or {name}) and imagePullSecrets. */}}
{{- define "migration-runner.imagePullSecrets" -}}
{{- $global := include "migration-runner.global" . | fromYaml }}
{{- $names := list }}
{{- range concat ($global.imagePullSecrets | default list) (.Values.imagePullSecrets | default list) }}
{{- $name := kindIs "map" . | ternary (get (kindIs "map" . | ternary . dict) "name") . }}
{{- if and $name (not (has $name $names)) }}
{{- $names = append $names $name }}
{{- end }}
{{- end }}
{{- range $names }}
- name: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Whether the fixed UID/GID of the security contexts are dropped (OpenShift's
restricted-v2 assigns its own): global.compatibility.openshift.adaptSecurityContext
"force", or "auto" on a cluster that serves security.openshift.io/v1.
*/}}
{{- define "migration-runner.adaptSecurityContext" -}}
{{- $global := include "migration-runner.global" . | fromYaml }}
{{- $adapt := ((($global.compatibility | default dict).openshift | default dict).adaptSecurityContext) | default "auto" }}
{{- if or (eq $adapt "force") (and (eq $adapt "auto") .Capabilities (.Capabilities.APIVersions.Has "security.openshift.io/v1")) }}true{{ end }}
{{- end }}

{{/* A security context (argument "sc") for this cluster: without runAsUser, runAsGroup, fsGroup when adapted. */}}
{{- define "migration-runner.securityContext" -}}
{{- $sc := .sc | default dict }}
{{- if include "migration-runner.adaptSecurityContext" .context }}
{{- $sc = omit $sc "runAsUser" "runAsGroup" "fsGroup" }}
{{- end }}
{{- with $sc }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* The ServiceAccount the Job runs as. */}}
{{- define "migration-runner.serviceAccountName" -}}
{{- $sa := .Values.serviceAccount | default dict }}
{{- if $sa.create }}
{{- default (include "migration-runner.fullname" .) $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{/*
The ServiceAccount of pods that outlive the hooks (the verify CronJob's): the
chart's own only where it is an ordinary resource (mode job, with the Job);
serviceAccount.name (or "default") when serviceAccount.create is false; empty
(the namespace's default) where the chart's is a hook, deleted after the Job,
or not rendered at all.
*/}}
{{- define "migration-runner.ordinaryServiceAccountName" -}}
{{- $sa := .Values.serviceAccount | default dict }}
{{- if or (not $sa.create) (and .Values.job.enabled (eq .Values.mode "job")) }}
{{- include "migration-runner.serviceAccountName" . }}
{{- end }}
{{- end }}

{{/*
Whether the Job's Secret and ConfigMap are hooks (mode hook or argocd, with the
Job): then the Job mounts hook copies, deleted with it, and the chart's ordinary
Secret and ConfigMap stay for the application's pods (init or wait containers)
and the helm test pod, which start after the hook and live on.
The hook copies keep the names chart 0.1.0 gave its hook Secret and ConfigMap
(<fullname>-database, <fullname>-migrations), so that before-hook-creation
replaces one an earlier run left behind; the ordinary ones have names no
earlier version used (<fullname>-db-url, <fullname>-migration-files), so that
an upgrade never meets a leftover hook under an ordinary resource's name
("invalid ownership metadata").
*/}}
{{- define "migration-runner.hookCopies" -}}
{{- if and .Values.job.enabled (has .Values.mode (list "hook" "argocd")) }}true{{ end }}
{{- end }}

{{/* The Secret holding the database URL, for the application's pods (an ordinary resource). */}}
{{- define "migration-runner.secretName" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecret }}
{{- else }}
{{- include "migration-runner.suffixedName" (dict "context" . "suffix" "db-url") }}
{{- end }}
{{- end }}

{{/* The Secret the Job mounts: a hook copy in modes hook and argocd. */}}
{{- define "migration-runner.jobSecretName" -}}
{{- if and (not .Values.database.existingSecret) (include "migration-runner.hookCopies" .) }}
{{- include "migration-runner.suffixedName" (dict "context" . "suffix" "database") }}
{{- else }}
{{- include "migration-runner.secretName" . }}
{{- end }}
{{- end }}

{{- define "migration-runner.secretKey" -}}
{{- if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}

{{/* The ConfigMap holding the migrations, for the application's pods (an ordinary resource). */}}
{{- define "migration-runner.configMapName" -}}
{{- if .Values.migrations.existingConfigMap }}
{{- .Values.migrations.existingConfigMap }}
{{- else }}
{{- include "migration-runner.suffixedName" (dict "context" . "suffix" "migration-files") }}
{{- end }}
{{- end }}

{{/* The ConfigMap the Job mounts: a hook copy in modes hook and argocd. */}}
{{- define "migration-runner.jobConfigMapName" -}}
{{- if and (not .Values.migrations.existingConfigMap) (include "migration-runner.hookCopies" .) }}
{{- include "migration-runner.suffixedName" (dict "context" . "suffix" "migrations") }}
{{- else }}
{{- include "migration-runner.configMapName" . }}
{{- end }}
{{- end }}

{{/* Whether the chart renders the migrations ConfigMap. */}}
{{- define "migration-runner.rendersConfigMap" -}}
{{- if and (eq .Values.migrations.source "configMap") (not .Values.migrations.existingConfigMap) }}true{{ end }}
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
{{- include "migration-runner.validateFleet" . }}
{{- if not (or .Values.database.existingSecret .Values.database.url .Values.fleet.enabled) }}
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
{{- /* Two paths that make the same ConfigMap key would render a duplicate key (one file lost, or refused). */}}
{{- $keys := dict }}
{{- range $path, $_ := .Values.migrations.files }}
{{- $key := include "migration-runner.fileKey" $path }}
{{- if hasKey $keys $key }}
{{- fail (printf "migration-runner: migrations.files %q and %q both become the ConfigMap key %q (a ConfigMap key holds no \"/\": each other character than letters, digits, \"-\", \"_\" and \".\" is written \"__\"); rename one of them" (get $keys $key) $path $key) }}
{{- end }}
{{- $_ := set $keys $key $path }}
{{- end }}
{{- end }}
{{- if and (eq .Values.migrations.source "volume") (not .Values.migrations.volume) }}
{{- fail "migration-runner: migrations.source is volume but migrations.volume is empty; give a volume source such as {persistentVolumeClaim: {claimName: NAME}}" }}
{{- end }}
{{- if and .Values.database.passwordFile .Values.config.passwordCommand }}
{{- fail "migration-runner: database.passwordFile and config.passwordCommand are both set; set at most one" }}
{{- end }}
{{- /* A password in database.url beside a rotating one: the runner would refuse it (exit 2) at every run. */}}
{{- if and (or .Values.database.passwordFile .Values.config.passwordCommand) (regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*:[^/?#@]*@" (.Values.database.url | toString)) }}
{{- fail "migration-runner: database.url holds a password, but database.passwordFile or config.passwordCommand supplies it at every login; leave it out of the URL" }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if has .name (list "DATABASE_URL" "DATABASE_URL_FILE") }}
{{- fail (printf "migration-runner: extraEnv must not set %s; the URL comes from database.existingSecret or database.url as a mounted file" .name) }}
{{- end }}
{{- end }}
{{- range concat (.Values.initContainers | default list) (.Values.sidecars | default list) }}
{{- if eq (.name | toString) "migration-runner" }}
{{- fail "migration-runner: initContainers and sidecars must not use the container name \"migration-runner\" (the runner's)" }}
{{- end }}
{{- end }}
{{- range .Values.extraVolumes }}
{{- if hasPrefix "migration-runner-" (.name | toString) }}
{{- fail (printf "migration-runner: extraVolumes: the name %s is the chart's (names starting with migration-runner- are reserved)" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Annotations of the resources the Job needs before it starts (hook copies of the
Secret and ConfigMap, ServiceAccount, the Job's NetworkPolicy). A pre-install
hook runs before the chart's ordinary resources exist, so in mode hook they are
hooks themselves with a lower weight, and in mode argocd PreSync hooks in an
earlier sync wave. In mode job, or without the Job, they are ordinary resources.
Arguments (a dict): context, and post (true for the ServiceAccount): with
postUpgrade.enabled it is also a hook of the post Job's events (post-install,
post-upgrade; PostSync), created again before the post Job, since the delete
policy that removes it after the pre hooks (hook-succeeded) would otherwise
leave the post Job's pod without its ServiceAccount. The post Job mounts the
ordinary Secret and ConfigMap, which exist by then.
*/}}
{{- define "migration-runner.preJobAnnotations" -}}
{{- $v := .context.Values }}
{{- $post := and .post $v.postUpgrade.enabled }}
{{- if $v.job.enabled }}
{{- if eq $v.mode "hook" }}
{{- $events := splitList "," (include "migration-runner.hookEvents" .context) }}
{{- if $post }}{{ $events = concat $events (list "post-install" "post-upgrade") | uniq }}{{ end }}
helm.sh/hook: {{ join "," $events | quote }}
helm.sh/hook-weight: {{ sub (int $v.hook.weight) 1 | quote }}
helm.sh/hook-delete-policy: {{ $v.hook.deletePolicy | quote }}
{{- else if eq $v.mode "argocd" }}
{{- $hooks := list $v.argocd.hook }}
{{- if $post }}{{ $hooks = append $hooks "PostSync" | uniq }}{{ end }}
argocd.argoproj.io/hook: {{ join "," $hooks | quote }}
argocd.argoproj.io/sync-wave: {{ sub (int $v.argocd.syncWave) 1 | quote }}
argocd.argoproj.io/hook-delete-policy: {{ $v.argocd.deletePolicy | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
MIGRATE_TARGET once a release is done: postUpgrade.target when the post Job
runs, config.target otherwise; what the verify CronJob and the helm test pod,
which run between releases, answer for (an application's wait container answers
for config.target: it starts between the pre and the post Job).
*/}}
{{- define "migration-runner.releaseTarget" -}}
{{- if and .Values.job.enabled .Values.postUpgrade.enabled }}
{{- .Values.postUpgrade.target }}
{{- else }}
{{- .Values.config.target }}
{{- end }}
{{- end }}

{{/*
The spec of a NetworkPolicy for the runner's pods of the given components (a
dict: context, components): no ingress; egress to DNS, the database port and
networkPolicy.extraEgress.
*/}}
{{- define "migration-runner.networkPolicySpec" -}}
{{- $v := .context.Values -}}
podSelector:
  matchLabels:
    {{- include "migration-runner.selectorLabels" .context | nindent 4 }}
  matchExpressions:
    - key: app.kubernetes.io/component
      operator: In
      values: {{ toJson .components }}
policyTypes:
  - Ingress
  - Egress
egress:
  - ports:
      - port: 53
        protocol: UDP
      - port: 53
        protocol: TCP
  - ports:
      {{- /* never null: a rule without a port would open every TCP port */}}
      - port: {{ $v.networkPolicy.databasePort | default 5432 }}
        protocol: TCP
    {{- with $v.networkPolicy.databasePeers }}
    to:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  {{- with $v.networkPolicy.extraEgress }}
  {{- tpl (toYaml .) $.context | nindent 2 }}
  {{- end }}
{{- end }}

{{/* hook.events without spaces ("pre-install, pre-upgrade" is "pre-install,pre-upgrade"). */}}
{{- define "migration-runner.hookEvents" -}}
{{- regexReplaceAll "\\s+" (.Values.hook.events | toString) "" }}
{{- end }}

{{/*
Annotations of a Job itself, per mode. Arguments (a dict): context, post (the
post Job: post-install,post-upgrade; PostSync). hook.outputLogPolicy has Helm
(3.18+) print the pods' logs, the runner's summary last, in its own output.
*/}}
{{- define "migration-runner.jobAnnotations" -}}
{{- $v := .context.Values }}
{{- $post := .post | default false }}
{{- $annotations := dict }}
{{- if eq $v.mode "hook" }}
{{- $annotations = dict "helm.sh/hook" ($post | ternary "post-install,post-upgrade" (include "migration-runner.hookEvents" .context)) "helm.sh/hook-weight" (int $v.hook.weight | toString) "helm.sh/hook-delete-policy" $v.hook.deletePolicy }}
{{- with $v.hook.outputLogPolicy }}
{{- $_ := set $annotations "helm.sh/hook-output-log-policy" . }}
{{- end }}
{{- else if eq $v.mode "argocd" }}
{{- $annotations = dict "argocd.argoproj.io/hook" ($post | ternary "PostSync" $v.argocd.hook) "argocd.argoproj.io/sync-wave" (int $v.argocd.syncWave | toString) "argocd.argoproj.io/hook-delete-policy" $v.argocd.deletePolicy }}
{{- end }}
{{- $annotations = merge $annotations ($v.job.annotations | default dict) }}
{{- include "migration-runner.annotations" (dict "context" .context "annotations" $annotations) }}
{{- end }}

{{/*
A Job's name: the full name for hooks (they delete the old Job first); in
mode job the full name and job.nameSuffixOverride, or a hash of the Job's whole
spec (a Job's pod template is immutable: any change makes a new Job), of the
migrations and of the database URL without its password (never a secret: the
name is readable by anyone who can list Jobs). The post Job's names have
"post" before the suffix. Arguments (a dict): context, post.
*/}}
{{- define "migration-runner.jobName" -}}
{{- $ctx := .context }}
{{- $post := .post | default false }}
{{- if eq $ctx.Values.mode "job" }}
{{- $suffix := include "migration-runner.dnsLabel" (dict "name" $ctx.Values.job.nameSuffixOverride "max" 20) }}
{{- $suffix = $suffix | default (include "migration-runner.settingsHash" .) }}
{{- include "migration-runner.suffixedName" (dict "context" $ctx "suffix" ($post | ternary (printf "post-%s" $suffix) $suffix)) }}
{{- else if $post }}
{{- include "migration-runner.suffixedName" (dict "context" $ctx "suffix" "post") }}
{{- else }}
{{- include "migration-runner.fullname" $ctx }}
{{- end }}
{{- end }}

{{/*
The database URL without what may be secret: without the user information, and
of the query only the parameters known to hold no secret (matched as written, so
a percent-encoded "pass%77ord" is dropped like "password").
*/}}
{{- define "migration-runner.publicUrl" -}}
{{- /* Up to the last "@" anywhere: an unencoded "?" or "/" in a password must not keep part of it. */}}
{{- $url := regexReplaceAll "^([A-Za-z][A-Za-z0-9+.-]*://).*@" (.Values.database.url | toString) "${1}" }}
{{- $parts := splitn "?" 2 $url }}
{{- $url = $parts._0 }}
{{- $safe := list "host" "hostaddr" "port" "dbname" "sslmode" "sslrootcert" "sslcert" "sslcrl" "connect_timeout"
  "application_name" "target_session_attrs" "load_balance_hosts" "gssencmode" "channel_binding" "client_encoding" "options" }}
{{- $kept := list }}
{{- range splitList "&" ($parts._1 | default "") }}
{{- if has (splitn "=" 2 .)._0 $safe }}
{{- $kept = append $kept . }}
{{- end }}
{{- end }}
{{- $url }}{{ with $kept }}?{{ join "&" . }}{{ end }}
{{- end }}

{{/* A short hash of everything that makes one migration run differ from another (a dict: context, post). */}}
{{- define "migration-runner.settingsHash" -}}
{{- $parts := list (include "migration-runner.jobSpec" .) (toJson .context.Values.migrations) (include "migration-runner.publicUrl" .context) }}
{{- join "\n" $parts | sha256sum | trunc 8 }}
{{- end }}

{{/*
Environment variables: each runner setting from values (the names are the
runner's, see runner/settings.py). Arguments (a dict): context, and job (true
only for the runner of the chart's own pods, the migration Jobs' and the verify
CronJob's, where it is the pod's last work): MIGRATE_QUIT_URLS is set only
there, since the runner POSTs those URLs as every command exits, and an
application pod's init or wait container, or the helm test pod, would stop the
pod's own proxies; target overrides config.target (MIGRATE_TARGET), e.g. the
post Job's postUpgrade.target.
*/}}
{{- define "migration-runner.env" -}}
{{- $forJob := .job | default false }}
{{- $v := .context.Values -}}
{{- $config := $v.config | default dict }}
{{- if hasKey . "target" }}
{{- $config = merge (dict "target" .target) $config }}
{{- end -}}
- name: DATABASE_URL_FILE
  value: {{ printf "%s/url" (trimSuffix "/" $v.database.mountPath) | quote }}
{{- with $v.database.passwordFile }}
- name: DATABASE_PASSWORD_FILE
  value: {{ . | quote }}
{{- end }}
{{- if eq $v.migrations.source "image" }}
{{- /* Recorded with the lineage: an older image refused on this database names the image to downgrade with
(only when the image holds the migrations; otherwise it would name an image without them). */}}
- name: MIGRATE_IMAGE
  value: {{ include "migration-runner.image" $.context | quote }}
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
  "verifyBaseline" "MIGRATE_VERIFY_BASELINE"
  "history" "MIGRATE_HISTORY"
  "historySchema" "MIGRATE_HISTORY_SCHEMA"
  "allowMultipleHeads" "MIGRATE_ALLOW_MULTIPLE_HEADS"
  "allowAhead" "MIGRATE_ALLOW_AHEAD"
  "fastPath" "MIGRATE_FAST_PATH"
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
  "quitUrls" "MIGRATE_QUIT_URLS"
  "passwordCommand" "MIGRATE_PASSWORD_COMMAND"
  "passwordCommandTimeout" "MIGRATE_PASSWORD_COMMAND_TIMEOUT"
  "alembicSection" "ALEMBIC_SECTION"
  "alembicXArgs" "ALEMBIC_X_ARGS"
  "target" "MIGRATE_TARGET" }}
{{- if not $forJob }}
{{- $variables = omit $variables "quitUrls" }}
{{- end }}
{{- range $key, $name := $variables }}
{{- $value := index $config $key }}
{{- if kindIs "slice" $value }}
{{- $value = join "," $value }}
{{- end }}
{{- if and (not (kindIs "invalid" $value)) (ne (toString $value) "") }}
{{- if kindIs "float64" $value }}
{{- if eq $value (floor $value) }}{{ $value = int64 $value }}{{ end }}
{{- end }}
- name: {{ $name }}
  value: {{ toString $value | quote }}
{{- end }}
{{- end }}
{{- include "migration-runner.otelEnv" (dict "otel" $v.otel "job" $forJob) }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
OpenTelemetry's own variables, only with otel.endpoint set (nothing rendered
otherwise, so the Job's name hash stays what it was). The resource attributes
come from the downward API; k8s.job.name only in the chart's Jobs, whose pods
carry the job-name label (an application pod's init container has none).
*/}}
{{- define "migration-runner.otelEnv" -}}
{{- $otel := .otel | default dict }}
{{- if $otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $otel.endpoint | quote }}
{{- with $otel.protocol }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ . | quote }}
{{- end }}
{{- with ($otel.headersSecret | default dict) }}
{{- if .name }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ .name | quote }}
      key: {{ .key | default "headers" | quote }}
{{- end }}
{{- end }}
{{- if not (kindIs "invalid" $otel.flushTimeout) }}
- name: MIGRATE_OTEL_FLUSH_TIMEOUT
  value: {{ toString $otel.flushTimeout | quote }}
{{- end }}
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NAMESPACE_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- if .job }}
- name: K8S_JOB_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['job-name']
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.pod.name=$(K8S_POD_NAME),k8s.namespace.name=$(K8S_NAMESPACE_NAME)%s" (ternary ",k8s.job.name=$(K8S_JOB_NAME)" "" (.job | default false)) | quote }}
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
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The volumes the runner container mounts (extraVolumes included). Public: a
parent chart that includes "migration-runner.initContainer" adds these to its
pod's volumes:
  volumes:
    {{- include "migration-runner.volumes" (dict "chart" (index .Subcharts "migrationRunner")) | nindent 4 }}
Those name the chart's ordinary Secret and ConfigMap, which live as long as the
release; the chart's own Job passes "job" true for the ones it mounts.
*/}}
{{- define "migration-runner.volumes" -}}
{{- $ctx := .chart | default .context -}}
{{- $forJob := .job | default false -}}
- name: migration-runner-database
  secret:
    secretName: {{ $forJob | ternary (include "migration-runner.jobSecretName" $ctx) (include "migration-runner.secretName" $ctx) | quote }}
    {{- /* 0444: readable by the runner's UID whatever the fsGroup (OpenShift drops it, a
    podSecurityContext may leave it out); only this pod's containers see the file. */}}
    defaultMode: {{ .defaultMode | default 0444 }}
    items:
      - key: {{ include "migration-runner.secretKey" $ctx | quote }}
        path: url
- name: migration-runner-tmp
  emptyDir:
    sizeLimit: {{ $ctx.Values.tmpSizeLimit }}
{{- if eq $ctx.Values.migrations.source "configMap" }}
- name: migration-runner-migrations
  configMap:
    name: {{ $forJob | ternary (include "migration-runner.jobConfigMapName" $ctx) (include "migration-runner.configMapName" $ctx) | quote }}
    {{- if $ctx.Values.migrations.existingConfigMap }}
    {{- with $ctx.Values.migrations.existingConfigMapItems }}
    items:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- else }}
    items:
      {{- range $path, $_ := $ctx.Values.migrations.files }}
      - key: {{ include "migration-runner.fileKey" $path | quote }}
        path: {{ $path | quote }}
      {{- end }}
    {{- end }}
{{- else if eq $ctx.Values.migrations.source "volume" }}
- name: migration-runner-migrations
  {{- toYaml $ctx.Values.migrations.volume | nindent 2 }}
{{- end }}
{{- with $ctx.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The runner container. Arguments (a dict):
  context  the chart context (required)
  name     the container name (default "migration-runner")
  command  overrides values "command" (a list; empty keeps the image's ENTRYPOINT)
  args     overrides values "args" (a list, e.g. (list "wait"))
  job      true only for the runner of the migration Jobs and the verify CronJob (config.quitUrls is for them alone)
  target   overrides config.target (MIGRATE_TARGET)
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
    {{- $env := dict "context" $ctx "job" (.job | default false) }}
    {{- if hasKey . "target" }}{{ $_ := set $env "target" .target }}{{ end }}
    {{- include "migration-runner.env" $env | trim | nindent 4 }}
  {{- with concat ($v.envFrom | default list) ($v.extraEnvFrom | default list) }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    {{- include "migration-runner.volumeMounts" $ctx | trim | nindent 4 }}
  terminationMessagePolicy: FallbackToLogsOnError
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with include "migration-runner.securityContext" (dict "context" $ctx "sc" $v.securityContext) }}
  securityContext:
    {{- . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
The pod template of the runner's own pods (the migration Job's, the verify
CronJob's). Arguments (a dict):
  context    the chart context (required)
  component  the app.kubernetes.io/component label of the pod
  job        true only for the migration Jobs: the chart's ServiceAccount
  copies     mount the hook copies of the Secret and ConfigMap (default: job;
             they are the pre Job's, in modes hook and argocd); other pods mount
             the ordinary ones, which outlive the hooks
  quitUrls   pass config.quitUrls to the runner (default: job)
  args       overrides values "args" (a list)
  target     overrides config.target (MIGRATE_TARGET)
*/}}
{{- define "migration-runner.podTemplate" -}}
{{- $ctx := .context }}
{{- $v := $ctx.Values }}
{{- $forJob := .job | default false }}
{{- $copies := hasKey . "copies" | ternary .copies $forJob }}
{{- $container := dict "context" $ctx "job" (hasKey . "quitUrls" | ternary .quitUrls $forJob) }}
{{- if hasKey . "args" }}{{ $_ := set $container "args" .args }}{{ end -}}
{{- if hasKey . "target" }}{{ $_ := set $container "target" .target }}{{ end -}}
metadata:
  {{- $labels := include "migration-runner.selectorLabels" $ctx | fromYaml }}
  {{- $_ := set $labels "app.kubernetes.io/component" .component }}
  {{- if $v.disableIstioSidecar }}
  {{- $_ := set $labels "sidecar.istio.io/inject" "false" }}
  {{- end }}
  {{- $labels = merge $labels ($v.podLabels | default dict) ($v.commonLabels | default dict) }}
  labels:
    {{- toYaml $labels | nindent 4 }}
  {{- $podAnnotations := dict }}
  {{- if $v.disableIstioSidecar }}
  {{- $_ := set $podAnnotations "sidecar.istio.io/inject" "false" }}
  {{- end }}
  {{- $podAnnotations = merge $podAnnotations ($v.podAnnotations | default dict) }}
  {{- with $podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  restartPolicy: Never
  {{- if $forJob }}
  serviceAccountName: {{ include "migration-runner.serviceAccountName" $ctx | quote }}
  {{- else if include "migration-runner.ordinaryServiceAccountName" $ctx }}
  serviceAccountName: {{ include "migration-runner.ordinaryServiceAccountName" $ctx | quote }}
  {{- end }}
  automountServiceAccountToken: {{ eq (toString $v.automountServiceAccountToken) "true" }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  {{- if not (kindIs "invalid" $v.terminationGracePeriodSeconds) }}
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  {{- end }}
  {{- with include "migration-runner.imagePullSecrets" $ctx | trim }}
  imagePullSecrets:
    {{- . | nindent 4 }}
  {{- end }}
  {{- with include "migration-runner.securityContext" (dict "context" $ctx "sc" $v.podSecurityContext) }}
  securityContext:
    {{- . | nindent 4 }}
  {{- end }}
  {{- with $v.initContainers }}
  initContainers:
    {{- tpl (toYaml .) $ctx | nindent 4 }}
  {{- end }}
  containers:
    {{- include "migration-runner.container" $container | trim | nindent 4 }}
    {{- with $v.sidecars }}
    {{- tpl (toYaml .) $ctx | nindent 4 }}
    {{- end }}
  volumes:
    {{- include "migration-runner.volumes" (dict "chart" $ctx "job" $copies) | trim | nindent 4 }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- tpl (toYaml .) $ctx | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
The podFailurePolicy of the runner's Jobs (the migration Jobs', the verify
CronJob's), from the runner's exit-code table (files/exit-codes.json, generated
from runner/errors.py): fail the Job at once on a code a retry cannot fix,
ignore pod disruptions; nothing with job.podFailurePolicy false.
*/}}
{{- define "migration-runner.podFailurePolicy" -}}
{{- $table := .Files.Get "files/exit-codes.json" }}
{{- if not (regexMatch "^\\s*\\[\\s*\\{" $table) }}
{{- fail "migration-runner: files/exit-codes.json is missing or not the runner's exit-code table; regenerate it with helm/update-exit-codes.sh" }}
{{- end }}
{{- if .Values.job.podFailurePolicy }}
{{- $fatal := list }}
{{- range ($table | fromJsonArray) }}
{{- if and (not .retryable) (ne (int .code) 0) }}
{{- $fatal = append $fatal (int .code) }}
{{- end }}
{{- end -}}
podFailurePolicy:
  rules:
    {{- with $fatal }}
    # Exit codes a retry cannot fix: fail the Job at once.
    - action: FailJob
      onExitCodes:
        containerName: migration-runner
        operator: In
        values: {{ toJson . }}
    {{- end }}
    # Evictions, preemptions and node drains do not count against backoffLimit.
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
{{- end }}
{{- end }}

{{/*
The spec of a migration Job (everything but its metadata): the Job's name in
mode job carries its hash. Arguments (a dict): context, post (the post Job:
component post-migration, postUpgrade.target, the ordinary Secret and
ConfigMap; the pre Job runs config.target with the hook copies).
*/}}
{{- define "migration-runner.jobSpec" -}}
{{- $ctx := .context }}
{{- $v := $ctx.Values }}
{{- $post := .post | default false -}}
backoffLimit: {{ $v.job.backoffLimit }}
{{- with $v.job.activeDeadlineSeconds }}
activeDeadlineSeconds: {{ . }}
{{- end }}
{{- if and (eq $v.mode "job") (not (kindIs "invalid" $v.job.ttlSecondsAfterFinished)) }}
ttlSecondsAfterFinished: {{ $v.job.ttlSecondsAfterFinished }}
{{- end }}
{{- with include "migration-runner.podFailurePolicy" $ctx | trim }}
{{ . }}
{{- end }}
{{- $pod := dict "context" $ctx "component" "migration" "job" true "target" $v.config.target }}
{{- if $post }}
{{- $pod = dict "context" $ctx "component" "post-migration" "job" true "copies" false "target" $v.postUpgrade.target }}
{{- end }}
template:
  {{- include "migration-runner.podTemplate" $pod | trim | nindent 2 }}
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
schema while the Job is still running. Same dict as initContainer; its "name"
(default "wait-for-migrations") and "args" (default (list "wait")) are the
caller's when given.
*/}}
{{- define "migration-runner.waitContainer" -}}
{{- $params := dict "chart" .chart "name" (.name | default "wait-for-migrations") "args" (list "wait") }}
{{- if hasKey . "args" }}{{ $_ := set $params "args" .args }}{{ end }}
{{- if hasKey . "command" }}{{ $_ := set $params "command" .command }}{{ end }}
{{- include "migration-runner.initContainer" $params }}
{{- end }}

{{/*
A fleet's settings (fleet.*): its targets come from their own Secret, so it needs no database.url, but what
reads one database (the post Job, the verify CronJob) then has none.
*/}}
{{- define "migration-runner.validateFleet" -}}
{{- if .Values.fleet.enabled }}
{{- if not .Values.fleet.targetsSecret.name }}
{{- fail "migration-runner: fleet.enabled needs fleet.targetsSecret.name, the Secret holding the targets file (one URL per line)" }}
{{- end }}
{{- if not (or .Values.database.existingSecret .Values.database.url) }}
{{- if .Values.postUpgrade.enabled }}
{{- fail "migration-runner: postUpgrade.enabled runs on database.url or database.existingSecret, which a fleet without them lacks; leave postUpgrade off with fleet.enabled" }}
{{- end }}
{{- if .Values.verifyCronJob.enabled }}
{{- fail "migration-runner: verifyCronJob.enabled checks database.url or database.existingSecret, which a fleet without them lacks; leave verifyCronJob off with fleet.enabled" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
