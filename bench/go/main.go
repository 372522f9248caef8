// Command goref issues workload X509-SVIDs with Go's standard library only, the engine inside
// istiod and SPIRE, as the reference that bench/go_reference.py measures ca-service against.
//
// The leaf profile is ca-service's (ca_service/pki/templates.py build_svid_for): empty subject, one
// critical URI SAN, CA:FALSE (critical), keyUsage digitalSignature (critical; +keyEncipherment for an
// RSA leaf), EKU serverAuth+clientAuth, SKI = SHA-1 of the subjectPublicKey bits, AKI = the signer's
// SKI, a random positive 159-bit serial, notBefore backdated 5 minutes, notAfter 24 h later clamped to
// the signer's.
//
// Modes:
//
//	sds: generate an EC P-256 key, sign, PEM-encode the chain (leaf + signer) and the PKCS#8 key
//	csr: parse a PEM CSR, check its signature and its single URI SAN, sign its key, PEM-encode the chain
//
// After a short warm-up it issues on each of -workers goroutines for -seconds (or -n issuances each when
// -seconds is 0) and prints one JSON line: {"mode":..., "workers":..., "n":..., "seconds":..., "ops_s":...,
// "cpu_seconds":..., "ops_per_cpu_s":...}.
// Per-core figures run it with GOMAXPROCS=1 and one worker.
package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"encoding/asn1"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"sync"
	"syscall"
	"time"
)

type signer struct {
	cert    *x509.Certificate
	certPEM []byte
	key     crypto.Signer
}

func loadSigner(certFile, keyFile string) (*signer, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(certPEM)
	if block == nil {
		return nil, errors.New("no PEM certificate in " + certFile)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, err
	}
	kblock, _ := pem.Decode(keyPEM)
	if kblock == nil {
		return nil, errors.New("no PEM key in " + keyFile)
	}
	key, err := x509.ParsePKCS8PrivateKey(kblock.Bytes)
	if err != nil {
		return nil, err
	}
	s, ok := key.(crypto.Signer)
	if !ok {
		return nil, errors.New("key is not a signer")
	}
	return &signer{cert: cert, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: block.Bytes}), key: s}, nil
}

// subjectKeyID is RFC 5280 4.2.1.2 method 1, as ca_service.pki.keys.key_id computes it.
func subjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	var spki struct {
		Algorithm asn1.RawValue
		Key       asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &spki); err != nil {
		return nil, err
	}
	sum := sha1.Sum(spki.Key.Bytes)
	return sum[:], nil
}

var serialLimit = new(big.Int).Lsh(big.NewInt(1), 159)

func issue(s *signer, pub crypto.PublicKey, id *url.URL, now time.Time) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, serialLimit)
	if err != nil {
		return nil, err
	}
	if serial.Sign() == 0 {
		serial.SetInt64(1)
	}
	ski, err := subjectKeyID(pub)
	if err != nil {
		return nil, err
	}
	usage := x509.KeyUsageDigitalSignature
	if _, isRSA := pub.(*rsa.PublicKey); isRSA {
		usage |= x509.KeyUsageKeyEncipherment
	}
	notAfter := now.Add(24 * time.Hour)
	if notAfter.After(s.cert.NotAfter) {
		notAfter = s.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now.Add(-5 * time.Minute),
		NotAfter:              notAfter,
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		SubjectKeyId:          ski,
		AuthorityKeyId:        s.cert.SubjectKeyId,
		URIs:                  []*url.URL{id},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.cert, pub, s.key)
	if err != nil {
		return nil, err
	}
	return append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), s.certPEM...), nil
}

func sdsOnce(s *signer, id *url.URL, now time.Time) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	if _, err := issue(s, key.Public(), id, now); err != nil {
		return err
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8})
	return nil
}

func csrOnce(s *signer, csrPEM []byte, id *url.URL, now time.Time) error {
	block, _ := pem.Decode(csrPEM)
	if block == nil {
		return errors.New("no PEM CSR")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return err
	}
	if err := csr.CheckSignature(); err != nil {
		return err
	}
	// The identity comes from the caller; the CSR may name only that (ca_service/pki/csr.py).
	if len(csr.URIs) != 1 || csr.URIs[0].String() != id.String() || len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) != 0 {
		return errors.New("CSR names something else")
	}
	_, err = issue(s, csr.PublicKey, id, now)
	return err
}

// cpuSeconds is the user+system CPU time of this process (every thread: GC workers included), which a
// busy shared machine disturbs less than wall time.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

func main() {
	certFile := flag.String("cert", "", "signer certificate PEM")
	keyFile := flag.String("key", "", "signer PKCS#8 key PEM")
	csrFile := flag.String("csr", "", "CSR PEM (csr mode)")
	mode := flag.String("mode", "sds", "sds or csr")
	spiffeID := flag.String("spiffe-id", "spiffe://cluster.local/ns/bench/sa/workload", "URI SAN")
	n := flag.Int("n", 1000, "issuances per worker when -seconds is 0")
	seconds := flag.Float64("seconds", 0, "issue for this long instead of -n times")
	workers := flag.Int("workers", 1, "goroutines issuing in parallel")
	nowFlag := flag.String("now", "", "issue as of this RFC 3339 instant (default: the clock), as the Python side does")
	flag.Parse()
	now := time.Now()
	if *nowFlag != "" {
		parsed, err := time.Parse(time.RFC3339, *nowFlag)
		if err != nil {
			fmt.Fprintln(os.Stderr, "goref:", err)
			os.Exit(2)
		}
		now = parsed
	}
	if err := run(*certFile, *keyFile, *csrFile, *mode, *spiffeID, now, *n, *seconds, *workers); err != nil {
		fmt.Fprintln(os.Stderr, "goref:", err)
		os.Exit(1)
	}
}

func run(certFile, keyFile, csrFile, mode, spiffeID string, now time.Time, n int, duration float64, workers int) error {
	s, err := loadSigner(certFile, keyFile)
	if err != nil {
		return err
	}
	id, err := url.Parse(spiffeID)
	if err != nil {
		return err
	}
	var csrPEM []byte
	if mode == "csr" {
		if csrPEM, err = os.ReadFile(csrFile); err != nil {
			return err
		}
	} else if mode != "sds" {
		return fmt.Errorf("unknown mode %q", mode)
	}
	once := func() error {
		if mode == "csr" {
			return csrOnce(s, csrPEM, id, now)
		}
		return sdsOnce(s, id, now)
	}
	for i := 0; i < 50; i++ { // warm-up: first-use initialisation is not issuance cost
		if err := once(); err != nil {
			return err
		}
	}
	errs := make(chan error, workers)
	counts := make([]int, workers)
	cpuStart := cpuSeconds()
	var wg sync.WaitGroup
	started := time.Now()
	deadline := started.Add(time.Duration(duration * float64(time.Second)))
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			// Batches of 10 between clock reads, as bench/common.py rate() does.
			for duration > 0 && time.Now().Before(deadline) || duration <= 0 && counts[w] < n {
				for i := 0; i < 10; i++ {
					if err := once(); err != nil {
						errs <- err
						return
					}
				}
				counts[w] += 10
			}
		}(w)
	}
	wg.Wait()
	seconds := time.Since(started).Seconds()
	cpu := cpuSeconds() - cpuStart
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	total := 0
	for _, c := range counts {
		total += c
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"mode": mode, "workers": workers, "n": total, "seconds": seconds,
		"ops_s": float64(total) / seconds, "cpu_seconds": cpu, "ops_per_cpu_s": float64(total) / cpu,
	})
}
