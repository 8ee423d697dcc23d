{{/*
Name of the chart.
*/}}
{{- define "agentflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to 63 characters (DNS label limit).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "agentflow.fullname" -}}
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

{{/*
Name of one component's objects: <fullname>-<component>, within 63 characters. The
fullname is shortened, not the suffix, so components never collide.
Usage: include "agentflow.componentName" (dict "root" $ "component" "worker")
*/}}
{{- define "agentflow.componentName" -}}
{{- $max := sub 62 (len .component) | int }}
{{- printf "%s-%s" (include "agentflow.fullname" .root | trunc $max | trimSuffix "-") .component }}
{{- end }}

{{/*
Chart name and version, as used by the chart label.
*/}}
{{- define "agentflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "agentflow.labels" -}}
helm.sh/chart: {{ include "agentflow.chart" . }}
{{ include "agentflow.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: agentflow
{{- end }}

{{/*
Selector labels (must stay stable across upgrades).
*/}}
{{- define "agentflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels and selector labels of one component.
Usage: include "agentflow.componentLabels" (dict "root" $ "component" "worker")
*/}}
{{- define "agentflow.componentLabels" -}}
{{ include "agentflow.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "agentflow.componentSelectorLabels" -}}
{{ include "agentflow.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Name of the ServiceAccount of the control plane and the workers.
*/}}
{{- define "agentflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agentflow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference of a component; the tag defaults to the chart's appVersion.
Usage: include "agentflow.image" (dict "root" $ "image" .Values.worker.image)
*/}}
{{- define "agentflow.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion | toString) }}
{{- end }}

{{/*
Name of the JetStream stream of steps for the configured prefix (the same rule as
agentflow_bus.settings.stream_token: non-alphanumerics become "_", then upper case).
*/}}
{{- define "agentflow.stepsStream" -}}
{{- printf "%s_STEPS" (regexReplaceAll "[^A-Za-z0-9]" .Values.config.natsPrefix "_" | upper) }}
{{- end }}

{{/*
Fail early, with a useful message, on missing, unusable or contradicting values.
Renders nothing.
*/}}
{{- define "agentflow.validateValues" -}}
{{- $_ := required "jwt.secret or jwt.existingSecret is required (e.g. --set-string jwt.secret=$(openssl rand -hex 32))" (coalesce .Values.jwt.existingSecret .Values.jwt.secret) }}
{{- if and .Values.jwt.secret (not .Values.jwt.existingSecret) (lt (len (toString .Values.jwt.secret)) 32) }}
{{- fail "jwt.secret must be at least 32 characters (e.g. openssl rand -hex 32)" }}
{{- end }}
{{- $_ = required "externalDatabase.url or externalDatabase.existingSecret is required (postgresql://user:password@host:5432/agentflow)" (coalesce .Values.externalDatabase.existingSecret .Values.externalDatabase.url) }}
{{- $_ = required "externalNats.url or externalNats.existingSecret is required (nats://host:4222, JetStream enabled)" (coalesce .Values.externalNats.existingSecret .Values.externalNats.url) }}
{{- if and .Values.worker.keda.enabled .Values.worker.autoscaling.enabled }}
{{- fail "worker.keda.enabled and worker.autoscaling.enabled exclude each other (KEDA creates its own HorizontalPodAutoscaler): set worker.autoscaling.enabled=false" }}
{{- end }}
{{- if .Values.worker.keda.enabled }}
{{- $_ = required "worker.keda.natsMonitoringEndpoint is required with worker.keda.enabled (host:8222 of the NATS monitoring port)" .Values.worker.keda.natsMonitoringEndpoint }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.worker.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs worker.metrics.enabled (the workers' ServiceMonitor scrapes their metrics port)" }}
{{- end }}
{{- end }}

{{/*
Whether the chart must create its Secret: some secret value was given inline rather
than through an existing Secret.
*/}}
{{- define "agentflow.createSecret" -}}
{{- if or (include "agentflow.inlineJwtSecret" .) (include "agentflow.inlineDatabaseUrl" .) (include "agentflow.inlineNatsUrl" .) -}}
true
{{- end }}
{{- end }}

{{/*
Whether the database URL / NATS URL / JWT secret are given inline (so the chart stores them).
*/}}
{{- define "agentflow.inlineDatabaseUrl" -}}
{{- if and .Values.externalDatabase.url (not .Values.externalDatabase.existingSecret) -}}
true
{{- end }}
{{- end }}

{{- define "agentflow.inlineNatsUrl" -}}
{{- if and .Values.externalNats.url (not .Values.externalNats.existingSecret) -}}
true
{{- end }}
{{- end }}

{{- define "agentflow.inlineJwtSecret" -}}
{{- if and .Values.jwt.secret (not .Values.jwt.existingSecret) -}}
true
{{- end }}
{{- end }}

{{/*
Secret `data` entries for the inline values.
*/}}
{{- define "agentflow.secretData.database" -}}
database-url: {{ .Values.externalDatabase.url | toString | b64enc | quote }}
{{- end }}

{{/*
A Secret key reference: the existing Secret when one is named, else the chart's own.
Usage: include "agentflow.secretKeyRef" (dict "existing" "<name>" "existingKey" "<key>" "secretName" "<chart secret>" "key" "<key>")
*/}}
{{- define "agentflow.secretKeyRef" -}}
secretKeyRef:
  {{- if .existing }}
  name: {{ .existing | quote }}
  key: {{ .existingKey | quote }}
  {{- else }}
  name: {{ .secretName | quote }}
  key: {{ .key | quote }}
  {{- end }}
{{- end }}

{{/*
AGENTFLOW_NATS_URL (control plane, workers).
*/}}
{{- define "agentflow.env.nats" -}}
- name: AGENTFLOW_NATS_URL
  valueFrom:
    {{- include "agentflow.secretKeyRef" (dict "existing" .Values.externalNats.existingSecret "existingKey" .Values.externalNats.existingSecretKey "secretName" (include "agentflow.fullname" .) "key" "nats-url") | nindent 4 }}
{{- end }}

{{/*
AGENTFLOW_DATABASE_URL (control plane, migrate).
Usage: include "agentflow.env.database" (dict "root" $ "secretName" "<secret with inline values>")
*/}}
{{- define "agentflow.env.database" -}}
{{- $db := .root.Values.externalDatabase -}}
- name: AGENTFLOW_DATABASE_URL
  valueFrom:
    {{- include "agentflow.secretKeyRef" (dict "existing" $db.existingSecret "existingKey" $db.existingSecretKey "secretName" .secretName "key" "database-url") | nindent 4 }}
{{- end }}

{{/*
JWT settings (control plane).
*/}}
{{- define "agentflow.env.jwt" -}}
{{- $jwt := .Values.jwt -}}
- name: AGENTFLOW_DEV_MODE
  value: "false"
- name: AGENTFLOW_JWT_SECRET
  valueFrom:
    {{- include "agentflow.secretKeyRef" (dict "existing" $jwt.existingSecret "existingKey" $jwt.existingSecretKey "secretName" (include "agentflow.fullname" .) "key" "jwt-secret") | nindent 4 }}
{{- if $jwt.publicKey }}
- name: AGENTFLOW_JWT_PUBLIC_KEY
  value: {{ $jwt.publicKey | quote }}
{{- end }}
{{- end }}

{{/*
envFrom of the control plane and the workers: the chart's ConfigMap, then the user's.
*/}}
{{- define "agentflow.envFrom" -}}
- configMapRef:
    name: {{ include "agentflow.fullname" . }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Mount of the tools file (control plane, workers), when tools are configured.
*/}}
{{- define "agentflow.toolsVolumeMount" -}}
{{- if .Values.config.tools }}
- name: tools
  mountPath: /etc/agentflow
  readOnly: true
{{- end }}
{{- end }}

{{- define "agentflow.toolsVolume" -}}
{{- if .Values.config.tools }}
- name: tools
  configMap:
    name: {{ include "agentflow.componentName" (dict "root" . "component" "tools") }}
{{- end }}
{{- end }}

{{/*
Pod-level settings shared by every workload.
*/}}
{{- define "agentflow.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
automountServiceAccountToken: {{ .Values.serviceAccount.automount }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/*
Scheduling settings of a component (nodeSelector, affinity, tolerations, spread).
Usage: include "agentflow.scheduling" .Values.worker
*/}}
{{- define "agentflow.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/*
Egress rule for DNS (every component).
*/}}
{{- define "agentflow.egress.dns" -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
  {{- with .Values.networkPolicy.dnsTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Egress rule for the OTLP collector (control plane, workers) when tracing is on: the
endpoint's port, or the scheme's usual OTLP/HTTP port.
*/}}
{{- define "agentflow.egress.otlp" -}}
{{- if .Values.tracing.otlpEndpoint }}
{{- $u := urlParse .Values.tracing.otlpEndpoint }}
{{- $port := regexFind "[0-9]+$" $u.host | default (ternary "443" "4318" (eq $u.scheme "https")) }}
- ports:
    - port: {{ $port | int }}
      protocol: TCP
  {{- with .Values.networkPolicy.otlpTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
An egress rule to one port, optionally restricted to some peers.
Usage: include "agentflow.egress.port" .Values.networkPolicy.postgres
*/}}
{{- define "agentflow.egress.port" -}}
- ports:
    - port: {{ .port | int }}
      protocol: TCP
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
