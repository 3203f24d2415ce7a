{{/* Labels every object carries; the DaemonSet selects by them. */}}
{{- define "waymark.labels" -}}
{ app.kubernetes.io/name: {{ .Chart.Name }}, app.kubernetes.io/instance: {{ .Release.Name }} }
{{- end }}

{{/* The agent image. */}}
{{- define "waymark.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
