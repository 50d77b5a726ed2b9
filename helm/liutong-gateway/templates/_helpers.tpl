{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "liutong.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "liutong.fullname" -}}
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

{{/* The admin Service's name; 57 + "-admin" stays within 63 characters. */}}
{{- define "liutong.adminName" -}}
{{- printf "%s-admin" (include "liutong.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "liutong.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "liutong.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels --------------------------------------------------------------------------------- */}}

{{- define "liutong.selectorLabels" -}}
app.kubernetes.io/name: {{ include "liutong.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "liutong.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "liutong.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: liutong-gateway
liutong.io/mode: {{ .Values.mode }}
{{- end }}

{{/* Images --------------------------------------------------------------------------------- */}}

{{- define "liutong.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "liutong.modelServerImage" -}}
{{- $image := .Values.modelServer.image }}
{{- if not $image.repository }}
{{- fail "mode=sidecar needs modelServer.image.repository: the model server that runs next to the gateway" }}
{{- end }}
{{- printf "%s:%s" $image.repository (required "modelServer.image.tag is required" $image.tag) }}
{{- end }}

{{/* Secret ---------------------------------------------------------------------------------- */}}

{{/* The Secret the gateway reads its env from: an existing one, the chart's, or none. */}}
{{- define "liutong.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else if and .Values.secret.create (or .Values.redis.url .Values.secret.env) }}
{{- include "liutong.fullname" . }}
{{- end }}
{{- end }}

{{/* Draining ----------------------------------------------------------------------------------
  On deletion a pod first runs its preStop sleep (endpoints are removed meanwhile), then the
  gateway gets SIGTERM: /readyz turns 503 at once and in-flight streams get drain_grace_seconds.
  The grace period covers both plus a margin, so that the kubelet never SIGKILLs a draining
  gateway.
*/}}

{{- define "liutong.drainGraceSeconds" -}}
{{- $grace := 30 }}
{{- if hasKey .Values.config "drain_grace_seconds" }}
{{- $grace = .Values.config.drain_grace_seconds }}
{{- end }}
{{- $grace | float64 | ceil | int }}
{{- end }}

{{- define "liutong.terminationGracePeriodSeconds" -}}
{{- add .Values.drain.preStopSleepSeconds (include "liutong.drainGraceSeconds" . | int) .Values.drain.terminationMarginSeconds }}
{{- end }}

{{/* The model server keeps serving until the gateway in front of it has drained. */}}
{{- define "liutong.modelServerPreStopSeconds" -}}
{{- if .Values.modelServer.preStopSleepSeconds }}
{{- .Values.modelServer.preStopSleepSeconds }}
{{- else }}
{{- add .Values.drain.preStopSleepSeconds (include "liutong.drainGraceSeconds" . | int) }}
{{- end }}
{{- end }}

{{/* Validation ------------------------------------------------------------------------------- */}}

{{- define "liutong.validate" -}}
{{- range $key := list "listen" "admin_listen" "redis_url" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s is set by the chart: use ports.* for the listeners and redis.url or secret.existingSecret for Redis" $key) }}
{{- end }}
{{- end }}
{{- if and (eq .Values.mode "sidecar") (not .Values.config.models) }}
{{- fail "mode=sidecar needs config.models, each with upstreams: [http://127.0.0.1:<modelServer.port>]" }}
{{- end }}
{{- $replicas := ternary .Values.autoscaling.maxReplicas .Values.replicaCount .Values.autoscaling.enabled | int }}
{{- $redis := or .Values.redis.url .Values.secret.existingSecret (hasKey .Values.secret.env "LIUTONG_REDIS_URL") }}
{{- if and (gt $replicas 1) (not $redis) }}
{{- fail "more than one replica needs a shared store: set redis.url (or secret.existingSecret with LIUTONG_REDIS_URL); the embedded store is per pod" }}
{{- end }}
{{- end }}
