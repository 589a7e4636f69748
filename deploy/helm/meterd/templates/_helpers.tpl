{{/* Names and labels shared by the templates. */}}
{{- define "meterd.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meterd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meterd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meterd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "meterd.labels" -}}
{{ include "meterd.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "meterd.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The Secret holding the API keys. */}}
{{- define "meterd.keysSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-keys" (include "meterd.fullname" .)) -}}
{{- end -}}

{{/* The environment variable a key is read from: METERD_KEY_<NAME>. */}}
{{- define "meterd.keyEnv" -}}
{{- printf "METERD_KEY_%s" (. | upper | replace "-" "_") -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: longer than shutdown_grace, preStop included. */}}
{{- define "meterd.terminationGrace" -}}
{{- add .Values.server.shutdownGraceSeconds .Values.server.preStopSleepSeconds .Values.server.terminationGraceMarginSeconds -}}
{{- end -}}

{{/* Checks that fail the render with a message instead of a broken release. */}}
{{- define "meterd.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.redis.url) -}}
{{- fail "replicaCount > 1 needs redis.url: meterd instances share limit totals and entitlements through Redis" -}}
{{- end -}}
{{- if not .Values.auth.keys -}}
{{- fail "auth.keys: meterd refuses to listen on a non-loopback address without API keys" -}}
{{- end -}}
{{- if le (int .Values.server.shutdownGraceSeconds) 0 -}}
{{- fail "server.shutdownGraceSeconds must be more than zero" -}}
{{- end -}}
{{- if and .Values.stripe.enabled (not .Values.stripe.apiKeySecret.name) -}}
{{- fail "stripe.enabled needs stripe.apiKeySecret.name" -}}
{{- end -}}
{{- range .Values.auth.keys -}}
{{- if not (regexMatch "^[a-z0-9_-]{1,64}$" .name) -}}
{{- fail (printf "auth.keys: key name %q must be [a-z0-9_-]{1,64}" .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
