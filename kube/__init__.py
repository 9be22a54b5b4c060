"""The Kubernetes operator: the SpliceJob resource reconciled into controller and worker pods."""
