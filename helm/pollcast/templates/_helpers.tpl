{{/*
Names. The release's resources are "<fullname>-api" and "<fullname>-edge".
*/}}
{{- define "pollcast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pollcast.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else if contains (include "pollcast.name" .) .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "pollcast.name" .) | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "pollcast.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "pollcast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.region }}
pollcast.io/region: {{ . }}
{{- end }}
{{- end }}

{{/* Selector labels of one role ("api" or "edge"); pass (dict "ctx" $ "role" "api"). */}}
{{- define "pollcast.selector" -}}
app.kubernetes.io/name: {{ include "pollcast.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "pollcast.secretName" -}}
{{- default (printf "%s-secrets" (include "pollcast.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "pollcast.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pollcast.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pollcast.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The Deployment of one role. Pass (dict "ctx" $ "role" "api"|"edge"). Both roles
share everything but their flags, sizes and shutdown.
*/}}
{{- define "pollcast.deployment" -}}
{{- $ := .ctx }}
{{- $role := .role }}
{{- $v := index $.Values $role }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "pollcast.fullname" $ }}-{{ $role }}
  labels:
    {{- include "pollcast.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ $role }}
spec:
  {{- if not (and (eq $role "edge") $v.autoscaling.enabled) }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      # Edges: one at a time, so at most one pod's clients reconnect at once.
      maxUnavailable: {{ ternary 1 0 (eq $role "edge") }}
      maxSurge: 1
  selector:
    matchLabels:
      {{- include "pollcast.selector" (dict "ctx" $ "role" $role) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "pollcast.labels" $ | nindent 8 }}
        app.kubernetes.io/component: {{ $role }}
      annotations:
        # A changed secret rolls the pods, which read it only at start.
        checksum/secrets: {{ include (print $.Template.BasePath "/secret.yaml") $ | sha256sum }}
    spec:
      serviceAccountName: {{ include "pollcast.serviceAccountName" $ }}
      automountServiceAccountToken: false
      {{- with $.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $.Values.podSecurityContext | nindent 8 }}
      # Edges: the preStop pause, then pollcast's own drain (queues flushed, 1001
      # closes), well inside this.
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- if $.Values.topologySpread.enabled }}
      topologySpreadConstraints:
        {{- range $key := list $.Values.topologySpread.zoneKey "kubernetes.io/hostname" }}
        - maxSkew: {{ $.Values.topologySpread.maxSkew }}
          topologyKey: {{ $key }}
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "pollcast.selector" (dict "ctx" $ "role" $role) | nindent 14 }}
        {{- end }}
      {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: pollcast
          image: {{ include "pollcast.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          args: ["serve"]
          env:
            - name: POLLCAST_ROLE
              value: {{ $role }}
            - name: POLLCAST_LISTEN
              value: "0.0.0.0:8080"
            - name: POLLCAST_DATA_DIR
              value: /data
            {{- with $.Values.region }}
            - name: POLLCAST_REGION
              value: {{ . | quote }}
            {{- end }}
            - name: POLLCAST_NATS_URL
              value: {{ join "," $.Values.nats.urls | quote }}
            - name: POLLCAST_STREAM_NAME
              value: {{ $.Values.nats.streamName | quote }}
            - name: POLLCAST_STREAM_REPLICAS
              value: {{ $.Values.nats.streamReplicas | quote }}
            - name: POLLCAST_STREAM_MAX_AGE
              value: {{ $.Values.nats.streamMaxAge | quote }}
            {{- if $.Values.nats.credentialsSecret }}
            - name: POLLCAST_NATS_CREDS
              value: /etc/pollcast/nats/nats.creds
            {{- end }}
            - name: POLLCAST_SECRET
              valueFrom:
                secretKeyRef:
                  name: {{ include "pollcast.secretName" $ }}
                  key: token-secret
            {{- if eq $role "api" }}
            - name: POLLCAST_DATABASE_URL
              valueFrom:
                secretKeyRef:
                  name: {{ include "pollcast.secretName" $ }}
                  key: database-url
            {{- with $v.corsOrigins }}
            - name: POLLCAST_CORS_ORIGINS
              value: {{ join "," . | quote }}
            {{- end }}
            {{- end }}
            {{- if eq $role "edge" }}
            {{- with $v.wsOrigins }}
            - name: POLLCAST_WS_ORIGINS
              value: {{ join "," . | quote }}
            {{- end }}
            {{- with $v.maxConnections }}
            - name: POLLCAST_MAX_CONNECTIONS
              value: {{ . | quote }}
            {{- end }}
            {{- end }}
            {{- with $.Values.trustedProxies }}
            - name: POLLCAST_TRUSTED_PROXIES
              value: {{ join "," . | quote }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: http
              containerPort: 8080
              protocol: TCP
          startupProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: 2
            # JetStream elects its leader and the api migrates: up to a minute.
            failureThreshold: 30
          livenessProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: 10
            failureThreshold: 3
          readinessProbe:
            httpGet:
              path: /readyz
              port: http
            periodSeconds: 5
            failureThreshold: 2
          {{- if eq $role "edge" }}
          lifecycle:
            preStop:
              # Out of the Service's endpoints before the drain starts, so no
              # new client lands on a pod that is closing.
              sleep:
                seconds: {{ $v.preStopSeconds }}
          {{- end }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: data
              mountPath: /data
            {{- if $.Values.nats.credentialsSecret }}
            - name: nats-creds
              mountPath: /etc/pollcast/nats
              readOnly: true
            {{- end }}
      volumes:
        # The root file system is read-only; pollcast writes nothing else.
        - name: data
          emptyDir:
            sizeLimit: 64Mi
        {{- if $.Values.nats.credentialsSecret }}
        - name: nats-creds
          secret:
            secretName: {{ $.Values.nats.credentialsSecret }}
        {{- end }}
{{- end }}

{{/* The Service of one role; pass (dict "ctx" $ "role" "api"|"edge"). */}}
{{- define "pollcast.service" -}}
{{- $ := .ctx }}
{{- $role := .role }}
{{- $v := index $.Values $role }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "pollcast.fullname" $ }}-{{ $role }}
  labels:
    {{- include "pollcast.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ $role }}
  {{- with $v.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $v.service.type }}
  selector:
    {{- include "pollcast.selector" (dict "ctx" $ "role" $role) | nindent 4 }}
  ports:
    - name: http
      port: {{ $v.service.port }}
      targetPort: http
      protocol: TCP
{{- end }}

{{/* The Ingress of one role, when enabled; pass (dict "ctx" $ "role" "api"|"edge" "path" "/ws"). */}}
{{- define "pollcast.ingress" -}}
{{- $ := .ctx }}
{{- $role := .role }}
{{- $v := index $.Values $role }}
{{- if $v.ingress.enabled }}
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {{ include "pollcast.fullname" $ }}-{{ $role }}
  labels:
    {{- include "pollcast.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ $role }}
  {{- with $v.ingress.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.ingress.className }}
  ingressClassName: {{ . }}
  {{- end }}
  {{- with $v.ingress.tls }}
  tls:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  rules:
    - host: {{ $v.ingress.host | quote }}
      http:
        paths:
          - path: {{ .path }}
            pathType: Prefix
            backend:
              service:
                name: {{ include "pollcast.fullname" $ }}-{{ $role }}
                port:
                  name: http
{{- end }}
{{- end }}

{{/* The PodDisruptionBudget of one role; pass (dict "ctx" $ "role" "api"|"edge"). */}}
{{- define "pollcast.pdb" -}}
{{- $ := .ctx }}
{{- $role := .role }}
{{- $v := index $.Values $role }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "pollcast.fullname" $ }}-{{ $role }}
  labels:
    {{- include "pollcast.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ $role }}
spec:
  maxUnavailable: {{ $v.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "pollcast.selector" (dict "ctx" $ "role" $role) | nindent 6 }}
{{- end }}
