{{/* Names and images shared by the templates. */}}
{{- define "wif-broker.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "wif-broker.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "wif-broker.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{/* sidecar.image is either {repository, tag} or one string. */}}
{{- define "wif-broker.sidecarImage" -}}
{{- $image := .Values.sidecar.image -}}
{{- if kindIs "string" $image -}}
{{- required "sidecar.image must not be empty" $image -}}
{{- else -}}
{{- printf "%s:%s" (required "sidecar.image.repository is required" $image.repository) (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "wif-broker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "wif-broker.tlsSecret" -}}
{{- printf "%s-tls" (include "wif-broker.fullname" .) -}}
{{- end -}}
