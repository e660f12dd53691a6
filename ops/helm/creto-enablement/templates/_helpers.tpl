{{/* Labels every object of the chart carries. */}}
{{- define "creto.commonLabels" -}}
app.kubernetes.io/part-of: creto-enablement
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Image reference. */}}
{{- define "creto.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* Names of shared objects. */}}
{{- define "creto.configName" -}}creto-enablement-config{{- end -}}

{{/*
Container settings shared by gateways, projectors and the init Job:
envFrom the ConfigMap, PGPASSWORD from the Secret, security context.
*/}}
{{- define "creto.containerCommon" -}}
image: {{ include "creto.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
envFrom:
  - configMapRef:
      name: {{ include "creto.configName" . }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{- define "creto.pgpasswordEnv" -}}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secret.name }}
      key: PGPASSWORD
{{- end -}}

{{/* HTTP probes on the named metrics port. */}}
{{- define "creto.probes" -}}
readinessProbe:
  httpGet: {path: /health, port: metrics}
  initialDelaySeconds: 5
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
livenessProbe:
  httpGet: {path: /health, port: metrics}
  initialDelaySeconds: 15
  periodSeconds: 20
  timeoutSeconds: 2
  failureThreshold: 3
{{- end -}}
