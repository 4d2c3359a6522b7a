{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "sidenet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: the release name, prefixed with the chart name unless the
release name already contains it.
*/}}
{{- define "sidenet.fullname" -}}
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
Name of cluster-scoped objects (ClusterRole, ClusterRoleBinding): cluster-wide names, so the
release namespace is part of them and two releases of the same name in different namespaces do
not collide.
*/}}
{{- define "sidenet.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "sidenet.fullname" .) | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "sidenet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidenet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sidenet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "sidenet.labels" -}}
helm.sh/chart: {{ include "sidenet.chart" . }}
{{ include "sidenet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: sidenet
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The ServiceAccount the controller runs as and the RBAC binds (with serviceAccount.create=false,
an existing one named by serviceAccount.name; see sidenet.validate).
*/}}
{{- define "sidenet.serviceAccountName" -}}
{{- default (include "sidenet.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "sidenet.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
True ("true") when the controller watches every namespace (watchNamespaces: ["*"]).
*/}}
{{- define "sidenet.watchAll" -}}
{{- if has "*" .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
The namespace the controller watches ("" = all namespaces): the value of SIDENET_NAMESPACE.
*/}}
{{- define "sidenet.watchNamespace" -}}
{{- if include "sidenet.watchAll" . }}
{{- else if .Values.watchNamespaces }}
{{- first .Values.watchNamespaces }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
Path of the broker CA bundle inside the container (SIDENET_BROKER_CA).
*/}}
{{- define "sidenet.brokerCAPath" -}}
/etc/sidenet/broker-ca/{{ .Values.broker.external.caSecret.key }}
{{- end }}

{{/*
Checks that values.schema.json cannot express (or only with unreadable messages). Included by
the Deployment, so `helm lint`, `helm template` and `helm install` all stop on them.
*/}}
{{- define "sidenet.validate" -}}
{{- $v := .Values }}
{{- if gt (int $v.replicaCount) 1 }}
{{- if not $v.leaderElection.enabled }}
{{- fail "replicaCount > 1 needs leaderElection.enabled=true: without it every pod would sign and publish configs" }}
{{- end }}
{{- if ne $v.broker.mode "external" }}
{{- fail "replicaCount > 1 needs broker.mode=external: each pod's embedded broker is a separate broker, and agents connected to a standby pod would receive no configs" }}
{{- end }}
{{- end }}
{{- if eq $v.broker.mode "external" }}
{{- if not $v.broker.external.url }}
{{- fail "broker.mode=external needs broker.external.url (mqtt://host:1883 or mqtts://host:8883)" }}
{{- end }}
{{- if and $v.broker.external.caSecret.name (not (hasPrefix "mqtts://" $v.broker.external.url)) }}
{{- fail "broker.external.caSecret is set but broker.external.url is not mqtts://: the CA would never be used" }}
{{- end }}
{{- else }}
{{- if or $v.broker.external.url $v.broker.external.existingSecret.name $v.broker.external.caSecret.name }}
{{- fail "broker.external.* is set but broker.mode is embedded: set broker.mode=external to use an external broker" }}
{{- end }}
{{- $svc := $v.broker.embedded.service }}
{{- if and (eq $svc.type "ClusterIP") (or (not (kindIs "invalid" $svc.nodePort)) (not (kindIs "invalid" $svc.externalTrafficPolicy))) }}
{{- fail "broker.embedded.service.nodePort and externalTrafficPolicy need type NodePort or LoadBalancer" }}
{{- end }}
{{- if and $svc.loadBalancerSourceRanges (ne $svc.type "LoadBalancer") }}
{{- fail "broker.embedded.service.loadBalancerSourceRanges needs type LoadBalancer" }}
{{- end }}
{{- end }}
{{- /* Port clashes inside the pod and on the MQTT Service. */}}
{{- $ports := dict (toString (int $v.metrics.containerPort)) "metrics.containerPort" }}
{{- if eq $v.broker.mode "embedded" }}
{{- $e := $v.broker.embedded }}
{{- $cp := toString (int $e.containerPort) }}
{{- if hasKey $ports $cp }}
{{- fail (printf "broker.embedded.containerPort %s is also %s: each listener of the pod needs its own port" $cp (get $ports $cp)) }}
{{- end }}
{{- $_ := set $ports $cp "broker.embedded.containerPort" }}
{{- if $e.tls.secretName }}
{{- $tp := toString (int $e.tls.containerPort) }}
{{- if hasKey $ports $tp }}
{{- fail (printf "broker.embedded.tls.containerPort %s is also %s: each listener of the pod needs its own port" $tp (get $ports $tp)) }}
{{- end }}
{{- if and $e.tls.plaintext (eq (int $e.tls.servicePort) (int $e.service.port)) }}
{{- fail (printf "broker.embedded.tls.servicePort %d is also broker.embedded.service.port: the MQTT Service needs two ports for plain MQTT and MQTT over TLS" (int $e.tls.servicePort)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (not $v.serviceAccount.create) (not $v.serviceAccount.name) }}
{{- fail "serviceAccount.create=false needs serviceAccount.name (an existing ServiceAccount bound to the RBAC this chart creates)" }}
{{- end }}
{{- end }}

{{/*
Port of broker.external.url: the one it names, else 1883 (mqtt://) or 8883 (mqtts://), as the
controller reads it.
*/}}
{{- define "sidenet.brokerPort" -}}
{{- $url := .Values.broker.external.url }}
{{- $hostport := trimSuffix "/" (regexReplaceAll "^mqtts?://" $url "") }}
{{- $m := regexFind ":[0-9]+$" $hostport }}
{{- if $m }}{{ trimPrefix ":" $m }}{{ else if hasPrefix "mqtts://" $url }}8883{{ else }}1883{{ end }}
{{- end }}
