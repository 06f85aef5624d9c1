{{/* Names and labels. */}}
{{- define "wavespeed-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wavespeed-bridge.fullname" -}}
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

{{- define "wavespeed-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wavespeed-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wavespeed-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wavespeed-bridge.labels" -}}
helm.sh/chart: {{ include "wavespeed-bridge.chart" . }}
{{ include "wavespeed-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: bridge
app.kubernetes.io/part-of: wavespeed-bridge
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "wavespeed-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "wavespeed-bridge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "wavespeed-bridge.secretName" -}}
{{- default (include "wavespeed-bridge.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{- define "wavespeed-bridge.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* true when the input needs SASL credentials. */}}
{{- define "wavespeed-bridge.sasl" -}}
{{- if hasPrefix "SASL" (.Values.config.kafka.security_protocol | default "PLAINTEXT") -}}true{{- end -}}
{{- end -}}

{{/* true when the Kafka connection uses TLS. */}}
{{- define "wavespeed-bridge.tls" -}}
{{- if has (.Values.config.kafka.security_protocol | default "PLAINTEXT") (list "SSL" "SASL_SSL") -}}true{{- end -}}
{{- end -}}

{{- define "wavespeed-bridge.secretsDir" -}}/var/run/secrets/wavespeed-bridge{{- end -}}
{{- define "wavespeed-bridge.webhookSecretDir" -}}/var/run/secrets/wavespeed-bridge-webhook{{- end -}}

{{/* true when the webhook receiver is on. */}}
{{- define "wavespeed-bridge.webhooks" -}}
{{- if (.Values.config.webhooks | default dict).enabled -}}true{{- end -}}
{{- end -}}
{{- define "wavespeed-bridge.caDir" -}}/etc/wavespeed-bridge/kafka-ca{{- end -}}
{{- define "wavespeed-bridge.configPath" -}}/etc/wavespeed-bridge/bridge.yaml{{- end -}}

{{/*
The bridge's config file: the values' config with the chart-managed keys set. server.host
must be 0.0.0.0 so the kubelet and Prometheus reach the pod, webhooks.host so the Service
and the Ingress do.
*/}}
{{- define "wavespeed-bridge.configYaml" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $kafka := deepCopy (.Values.config.kafka | default dict) -}}
{{- if include "wavespeed-bridge.sasl" . -}}
{{- $_ := set $kafka "sasl_password_file" (printf "%s/%s" (include "wavespeed-bridge.secretsDir" .) .Values.secretKeys.kafkaSaslPassword) -}}
{{- end -}}
{{- if .Values.kafkaCa.secretName -}}
{{- $_ := set $kafka "ssl_cafile" (printf "%s/%s" (include "wavespeed-bridge.caDir" .) .Values.kafkaCa.key) -}}
{{- end -}}
{{- $_ := set $cfg "kafka" $kafka -}}
{{- $webhooks := deepCopy (.Values.config.webhooks | default dict) -}}
{{- $_ := set $webhooks "host" "0.0.0.0" -}}
{{- if include "wavespeed-bridge.webhooks" . -}}
{{- $_ := set $webhooks "secret_file" (printf "%s/%s" (include "wavespeed-bridge.webhookSecretDir" .) .Values.secretKeys.webhookSecret) -}}
{{- end -}}
{{- $_ := set $cfg "webhooks" $webhooks -}}
{{- $_ := set $cfg "server" (dict "host" "0.0.0.0" "port" (int .Values.metrics.port)) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Seconds the kubelet waits after SIGTERM: longer than the bridge's own grace. */}}
{{- define "wavespeed-bridge.terminationGrace" -}}
{{- $grace := ceil .Values.config.shutdown_grace_s | int -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $grace 15 -}}
{{- else -}}
{{- $t := int .Values.terminationGracePeriodSeconds -}}
{{- if le $t (add $grace 10 | int) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed config.shutdown_grace_s + 10 (%d): the bridge needs its grace plus up to 10 s to close its Kafka clients" $t (add $grace 10)) -}}
{{- end -}}
{{- $t -}}
{{- end -}}
{{- end -}}

{{/* PromQL label matchers selecting this release's series. */}}
{{- define "wavespeed-bridge.promSelector" -}}
{{- if .Values.prometheusRule.selector -}}
{{- .Values.prometheusRule.selector -}}
{{- else -}}
namespace="{{ .Release.Namespace }}", job="{{ include "wavespeed-bridge.fullname" . }}"
{{- end -}}
{{- end -}}

{{- define "wavespeed-bridge.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled -}}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive: both would own the Deployment's replicas" -}}
{{- end -}}
{{- $pdb := .Values.podDisruptionBudget -}}
{{- if and $pdb.enabled (eq (toString ($pdb.maxUnavailable | default "")) "") (eq (toString ($pdb.minAvailable | default "")) "") -}}
{{- fail "podDisruptionBudget: set one of maxUnavailable and minAvailable" -}}
{{- end -}}
{{- if and $pdb.enabled (ne (toString ($pdb.maxUnavailable | default "")) "") (ne (toString ($pdb.minAvailable | default "")) "") -}}
{{- fail "podDisruptionBudget: set only one of maxUnavailable and minAvailable" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicaCount) (int .Values.keda.maxReplicaCount)) -}}
{{- fail "keda.minReplicaCount must not exceed keda.maxReplicaCount" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.targetCPUUtilizationPercentage .Values.autoscaling.targetMemoryUtilizationPercentage)) -}}
{{- fail "autoscaling: set targetCPUUtilizationPercentage and/or targetMemoryUtilizationPercentage" -}}
{{- end -}}
{{- if and .Values.webhookIngress.enabled (not (include "wavespeed-bridge.webhooks" .)) -}}
{{- fail "webhookIngress.enabled needs config.webhooks.enabled: there is no webhook port to route to" -}}
{{- end -}}
{{- if and (include "wavespeed-bridge.webhooks" .) (eq (int .Values.config.webhooks.port) (int .Values.metrics.port)) -}}
{{- fail "config.webhooks.port must differ from metrics.port" -}}
{{- end -}}
{{- if and (include "wavespeed-bridge.sasl" .) (not .Values.config.kafka.sasl_mechanism) -}}
{{- fail "config.kafka.sasl_mechanism is required when config.kafka.security_protocol is SASL_*" -}}
{{- end -}}
{{- end -}}
