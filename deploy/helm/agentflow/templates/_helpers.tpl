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
Image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "agentflow.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
Fail early, with a useful message, on missing or unusable required values.
Renders nothing.
*/}}
{{- define "agentflow.validateValues" -}}
{{- $_ := required "jwt.secret or jwt.existingSecret is required (e.g. --set-string jwt.secret=$(openssl rand -hex 32))" (coalesce .Values.jwt.existingSecret .Values.jwt.secret) }}
{{- if and .Values.jwt.secret (not .Values.jwt.existingSecret) (lt (len (toString .Values.jwt.secret)) 32) }}
{{- fail "jwt.secret must be at least 32 characters (e.g. openssl rand -hex 32)" }}
{{- end }}
{{- $_ = required "externalDatabase.url or externalDatabase.existingSecret is required (postgresql://user:password@host:5432/agentflow)" (coalesce .Values.externalDatabase.existingSecret .Values.externalDatabase.url) }}
{{- $_ = required "externalNats.url is required (nats://host:4222, JetStream enabled)" .Values.externalNats.url }}
{{- end }}

{{/*
Whether the chart must create its Secret: some secret value was given inline rather
than through an existing Secret.
*/}}
{{- define "agentflow.createSecret" -}}
{{- if or (include "agentflow.inlineJwtSecret" .) (include "agentflow.inlineDatabaseUrl" .) -}}
true
{{- end }}
{{- end }}

{{/*
Whether the database URL / JWT secret are given inline (so the chart stores them).
*/}}
{{- define "agentflow.inlineDatabaseUrl" -}}
{{- if and .Values.externalDatabase.url (not .Values.externalDatabase.existingSecret) -}}
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

{{- define "agentflow.secretData.jwt" -}}
jwt-secret: {{ .Values.jwt.secret | toString | b64enc | quote }}
{{- end }}

{{/*
Environment shared by every process: NATS, logging, extra variables.
*/}}
{{- define "agentflow.env.bus" -}}
- name: AGENTFLOW_NATS_URL
  value: {{ .Values.externalNats.url | quote }}
- name: AGENTFLOW_NATS_PREFIX
  value: {{ .Values.natsPrefix | quote }}
- name: AGENTFLOW_STEP_ACK_WAIT_S
  value: {{ .Values.stepAckWaitS | toString | quote }}
- name: AGENTFLOW_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- end }}

{{/*
AGENTFLOW_DATABASE_URL (control plane, migrate).
Usage: include "agentflow.env.database" (dict "root" $ "secretName" "<inline secret>")
secretName is the Secret holding inline values; an existing Secret takes precedence.
*/}}
{{- define "agentflow.env.database" -}}
{{- $db := .root.Values.externalDatabase -}}
- name: AGENTFLOW_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if $db.existingSecret }}
      name: {{ $db.existingSecret | quote }}
      key: {{ $db.existingSecretKey | quote }}
      {{- else }}
      name: {{ .secretName | quote }}
      key: database-url
      {{- end }}
{{- end }}

{{/*
JWT settings (control plane).
Usage: include "agentflow.env.jwt" (dict "root" $ "secretName" "<inline secret>")
*/}}
{{- define "agentflow.env.jwt" -}}
{{- $jwt := .root.Values.jwt -}}
- name: AGENTFLOW_DEV_MODE
  value: "false"
- name: AGENTFLOW_JWT_SECRET
  valueFrom:
    secretKeyRef:
      {{- if $jwt.existingSecret }}
      name: {{ $jwt.existingSecret | quote }}
      key: {{ $jwt.existingSecretKey | quote }}
      {{- else }}
      name: {{ .secretName | quote }}
      key: jwt-secret
      {{- end }}
{{- if $jwt.publicKey }}
- name: AGENTFLOW_JWT_PUBLIC_KEY
  value: {{ $jwt.publicKey | quote }}
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
