{{/*
Names, labels and the pieces every per-service template shares. Helpers taking a service get
a dict: root (the top context), role (auth, contacts, notifications, tasks, deals, gateway)
and svc (.Values.services.<role>).
*/}}

{{- define "crm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "crm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "crm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "crm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "crm.labels" -}}
helm.sh/chart: {{ include "crm.chart" . }}
{{ include "crm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: crm
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one service's objects; dict root role. */}}
{{- define "crm.componentLabels" -}}
{{ include "crm.labels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{/* What selects one service's pods; dict root role. */}}
{{- define "crm.componentSelectorLabels" -}}
{{ include "crm.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{/* <fullname>-<role>, short enough for "-headless" to fit 63 characters; dict root role. */}}
{{- define "crm.componentName" -}}
{{- printf "%s-%s" (include "crm.fullname" .root) .role | trunc 54 | trimSuffix "-" -}}
{{- end -}}

{{- define "crm.headlessName" -}}
{{- include "crm.componentName" . -}}-headless
{{- end -}}

{{- define "crm.configMapName" -}}
{{- include "crm.fullname" . -}}-config
{{- end -}}

{{- define "crm.secretName" -}}
{{- if .Values.existingSecret -}}
{{- .Values.existingSecret -}}
{{- else -}}
{{- include "crm.fullname" . -}}-secrets
{{- end -}}
{{- end -}}

{{- define "crm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "crm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The roles that own a database (and so a migration Job). */}}
{{- define "crm.databaseRoles" -}}
auth contacts notifications tasks deals
{{- end -}}

{{/* "true" when the role owns a database; dict role. */}}
{{- define "crm.hasDatabase" -}}
{{- if has .role (splitList " " (include "crm.databaseRoles" .)) -}}true{{- end -}}
{{- end -}}

{{/* The role's name in environment variables: CRM_<ROLE>_…; dict role. */}}
{{- define "crm.envRole" -}}
{{- .role | upper | replace "-" "_" -}}
{{- end -}}

{{/* The port's name: the gateway serves browsers and REST clients, the others gRPC. */}}
{{- define "crm.portName" -}}
{{- if eq .role "gateway" -}}http{{- else -}}grpc{{- end -}}
{{- end -}}

{{/* The image of one service: its own override over the global one; dict root svc. */}}
{{- define "crm.image" -}}
{{- $image := merge (dict) (default (dict) .svc.image) .root.Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (toString (default .root.Chart.AppVersion $image.tag)) -}}
{{- end -}}
{{- end -}}

{{- define "crm.imagePullPolicy" -}}
{{- $image := merge (dict) (default (dict) .svc.image) .root.Values.image -}}
{{- $image.pullPolicy -}}
{{- end -}}

{{/* Where the other roles reach one role: every replica behind its headless Service. */}}
{{- define "crm.addr" -}}
{{- if .svc.enabled -}}
{{- printf "%s:%v" (include "crm.headlessName" .) (int .svc.port) -}}
{{- else -}}
{{- .svc.addr -}}
{{- end -}}
{{- end -}}

{{/*
Hash of what the pods read from the ConfigMap and the Secret: a change rolls them. It covers
the inputs of the Secret rather than its rendered text, whose generated passwords would
otherwise change the hash on every render without a cluster to read them back from.
*/}}
{{- define "crm.configChecksum" -}}
{{- $config := include (print .Template.BasePath "/configmap.yaml") . -}}
{{- $secret := dict "secrets" .Values.secrets "existingSecret" .Values.existingSecret "tls" .Values.tls -}}
{{- printf "%s\n%s" $config (toJson $secret) | sha256sum -}}
{{- end -}}

{{/* A secret's value: the one given, else the one already in the cluster, else random. */}}
{{- define "crm.generated" -}}
{{- if .value -}}
{{- .value | b64enc -}}
{{- else if and .existing (hasKey .existing .key) -}}
{{- index .existing .key -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* Environment read from the Secret; optional keys may be absent from an existingSecret. */}}
{{- define "crm.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "crm.secretName" .root }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}

{{/* `name: value` map → env list; a map value is a valueFrom. */}}
{{- define "crm.envList" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  {{- if kindIs "map" $value }}
  valueFrom:
    {{- toYaml $value | nindent 4 }}
  {{- else }}
  value: {{ toString $value | quote }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Probe timings; dict probe (values.probes.<kind>). */}}
{{- define "crm.probeTimings" -}}
periodSeconds: {{ .periodSeconds }}
failureThreshold: {{ .failureThreshold }}
timeoutSeconds: {{ .timeoutSeconds }}
{{- end -}}

{{/*
One probe; dict root svc kind path. Native gRPC health on the port; over HTTPS when the port
refuses plaintext (tls.only), since kubelet's gRPC probes do not speak TLS. Liveness asks
/healthz, which only says the process runs (gRPC health follows readiness: NOT_SERVING while
the database is unreachable).
*/}}
{{- define "crm.probe" -}}
{{- $tlsOnly := and .root.Values.tls.enabled .root.Values.tls.only -}}
{{- if $tlsOnly }}
httpGet:
  path: {{ .path }}
  port: {{ .svc.port }}
  scheme: HTTPS
{{- else if eq .kind "liveness" }}
httpGet:
  path: /healthz
  port: {{ .svc.port }}
{{- else }}
grpc:
  port: {{ .svc.port }}
{{- end }}
{{ include "crm.probeTimings" (index .root.Values.probes .kind) }}
{{- end -}}

{{/* NetworkPolicy peers for one egress target (cidrs and raw peers); dict target. */}}
{{- define "crm.egressRule" -}}
- ports:
    {{- range .target.ports }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
  {{- if or .target.cidrs .target.peers }}
  to:
    {{- range .target.cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
    {{- with .target.peers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
{{- end -}}

{{/* PromQL label matchers selecting this release's series (as scraped by the ServiceMonitors). */}}
{{- define "crm.promSelector" -}}
namespace="{{ .Release.Namespace }}",job=~"{{ include "crm.fullname" . }}-.+"
{{- end -}}
