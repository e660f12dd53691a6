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

{{/* The NATS user's nkey seed (key nats-user.nk of the Secret), where the NATS server asks
for one (ops/nats/accounts.conf; set NATS_NKEY_SEED_FILE=/etc/creto/nats/nats-user.nk).
Optional: a server without logins needs none. */}}
{{- define "creto.natsLoginVolume" -}}
- name: nats-login
  secret:
    secretName: {{ .Values.secret.name }}
    items: [{key: nats-user.nk, path: nats-user.nk}]
    defaultMode: 0440
    optional: true
{{- end -}}
{{- define "creto.natsLoginMount" -}}
- {name: nats-login, mountPath: /etc/creto/nats, readOnly: true}
{{- end -}}

{{/* HTTP probes on the named metrics port. */}}
{{- define "creto.probes" -}}
readinessProbe:
  httpGet: {path: /health, port: metrics}
  initialDelaySeconds: 5
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
{{- /* Alive when the process answers (/metrics), whatever its dependencies say (/health): a
NATS, PostgreSQL or Redis outage must not become a crash loop. */}}
livenessProbe:
  httpGet: {path: /metrics, port: metrics}
  initialDelaySeconds: 15
  periodSeconds: 20
  timeoutSeconds: 2
  failureThreshold: 3
{{- end -}}
