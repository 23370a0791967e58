{{/*
Labels of every object: the same as deploy/kubernetes, plus Helm's own.
Names are fixed (`nodeway`): one release per cluster.
*/}}
{{- define "nodeway.labels" -}}
app.kubernetes.io/name: nodeway
app.kubernetes.io/part-of: nodeway
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "nodeway.selectorLabels" -}}
app.kubernetes.io/name: nodeway
{{- end }}
