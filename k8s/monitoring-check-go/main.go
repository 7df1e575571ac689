// Command monitoring-check validates Prometheus Operator objects (ServiceMonitor, PrometheusRule)
// against the operator's own Go API types (monitoring.coreos.com/v1), strictly: an unknown or
// misspelled field, a duplicate key or a value of the wrong type is an error. Reads a YAML stream
// (e.g. `k8s/kustomize build k8s/base`) on stdin; objects of other API groups are skipped, since
// kubernetes-validate checks those. Prints one line per object checked; exits 1 if any is invalid.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

func main() {
	reader := utilyaml.NewYAMLReader(bufio.NewReader(os.Stdin))
	failed := false
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "monitoring-check: reading stdin: %v\n", err)
			os.Exit(2)
		}
		var head struct {
			metav1.TypeMeta `json:",inline"`
			Metadata        struct{ Name string } `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &head); err != nil || head.Kind == "" {
			continue // an empty document, or not a Kubernetes object
		}
		gv, err := schema.ParseGroupVersion(head.APIVersion)
		if err != nil || gv.Group != monitoringv1.SchemeGroupVersion.Group {
			continue
		}
		var target any
		switch {
		case gv != monitoringv1.SchemeGroupVersion:
			err = fmt.Errorf("apiVersion %s: only %s is checked", head.APIVersion, monitoringv1.SchemeGroupVersion)
		case head.Kind == monitoringv1.ServiceMonitorsKind:
			target = &monitoringv1.ServiceMonitor{}
		case head.Kind == monitoringv1.PrometheusRuleKind:
			target = &monitoringv1.PrometheusRule{}
		default:
			err = fmt.Errorf("kind %s is not checked by this tool", head.Kind)
		}
		if err == nil {
			err = yaml.UnmarshalStrict(doc, target)
		}
		if err != nil {
			failed = true
			fmt.Printf("invalid %s/%s: %v\n", head.Kind, head.Metadata.Name, err)
		} else {
			fmt.Printf("valid %s/%s\n", head.Kind, head.Metadata.Name)
		}
	}
	if failed {
		os.Exit(1)
	}
}
