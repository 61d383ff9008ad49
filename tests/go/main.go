// gospiffe-check drives go-spiffe (the reference SPIFFE client library)
// against an oxid agent. The Rust test tests/go_spiffe.rs starts a real
// server and agent, registers this binary, runs one subcommand per case and
// asserts on what it prints: one JSON object for the one-shot checks, or
// event lines ("ready", "source update", ...) for the long-running ones.
//
// Every subcommand finds the agent through SPIFFE_ENDPOINT_SOCKET, as any
// go-spiffe program does.
package main

import (
	"bufio"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: gospiffe-check x509|jwt|serve|dial|watch|no-entry [flags]")
	}
	cmd, args := os.Args[1], os.Args[2:]
	// The long-running subcommands are stopped with SIGTERM: a clean exit.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM)
	go func() {
		<-stop
		os.Exit(0)
	}()
	var err error
	switch cmd {
	case "x509":
		err = checkX509()
	case "jwt":
		err = checkJWT(args)
	case "serve":
		err = serve(args)
	case "dial":
		err = dial(args)
	case "watch":
		err = watch()
	case "no-entry":
		err = noEntry()
	default:
		err = fmt.Errorf("unknown subcommand %q", cmd)
	}
	if err != nil {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "gospiffe-check:", msg)
	os.Exit(1)
}

func printJSON(v any) {
	out, err := json.Marshal(v)
	if err != nil {
		fail(err.Error())
	}
	fmt.Println(string(out))
}

func serial(cert *x509.Certificate) string { return cert.SerialNumber.Text(16) }

// checkX509 fetches the X509-SVID with NewX509Source and checks it the way
// a go-spiffe program relies on it: the key is the leaf's, and the chain
// verifies against the bundle the same source returned.
func checkX509() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		return fmt.Errorf("NewX509Source: %w", err)
	}
	defer src.Close()
	svid, err := src.GetX509SVID()
	if err != nil {
		return err
	}
	leaf := svid.Certificates[0]
	public, ok := svid.PrivateKey.Public().(interface{ Equal(crypto.PublicKey) bool })
	keyMatches := ok && public.Equal(leaf.PublicKey)
	verified, _, verr := x509svid.Verify(svid.Certificates, src)
	bundle, err := src.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
	if err != nil {
		return err
	}
	result := map[string]any{
		"spiffe_id":           svid.ID.String(),
		"serial":              serial(leaf),
		"chain_length":        len(svid.Certificates),
		"key_matches_leaf":    keyMatches,
		"verified_id":         verified.String(),
		"bundle_trust_domain": bundle.TrustDomain().String(),
		"bundle_authorities":  len(bundle.X509Authorities()),
		"hint":                svid.Hint,
	}
	if verr != nil {
		result["verify_error"] = verr.Error()
	}
	printJSON(result)
	return nil
}

// checkJWT fetches a JWT-SVID for several audiences through NewJWTSource,
// validates it offline against the source's JWT bundles, and then over the
// Workload API's ValidateJWTSVID.
func checkJWT(args []string) error {
	flags := flag.NewFlagSet("jwt", flag.ContinueOnError)
	audiences := flags.String("audiences", "", "comma-separated audiences")
	if err := flags.Parse(args); err != nil {
		return err
	}
	aud := strings.Split(*audiences, ",")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src, err := workloadapi.NewJWTSource(ctx)
	if err != nil {
		return fmt.Errorf("NewJWTSource: %w", err)
	}
	defer src.Close()
	svid, err := src.FetchJWTSVID(ctx, jwtsvid.Params{Audience: aud[0], ExtraAudiences: aud[1:]})
	if err != nil {
		return fmt.Errorf("FetchJWTSVID: %w", err)
	}
	token := svid.Marshal()
	parsed, err := jwtsvid.ParseAndValidate(token, src, aud)
	if err != nil {
		return fmt.Errorf("ParseAndValidate: %w", err)
	}
	result := map[string]any{
		"spiffe_id":       svid.ID.String(),
		"audience":        svid.Audience,
		"parsed_id":       parsed.ID.String(),
		"parsed_audience": parsed.Audience,
		"expires_in_secs": int(time.Until(parsed.Expiry).Seconds()),
	}
	// A token is only good for the audiences it names.
	_, err = jwtsvid.ParseAndValidate(token, src, []string{"spiffe://example.org/someone-else"})
	result["other_audience_error"] = errString(err)
	apiSVID, err := workloadapi.ValidateJWTSVID(ctx, token, aud[1%len(aud)])
	if err != nil {
		result["api_error"] = err.Error()
	} else {
		result["api_validated_id"] = apiSVID.ID.String()
	}
	_, err = workloadapi.ValidateJWTSVID(ctx, token, "spiffe://example.org/someone-else")
	result["api_other_audience_error"] = errString(err)
	printJSON(result)
	return nil
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// serve accepts mTLS connections with spiffetls.Listen, authorising only
// --allow, and answers every line with its own current serial and what it
// saw of the peer. It runs until killed.
func serve(args []string) error {
	flags := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := flags.String("listen", "127.0.0.1:0", "address")
	allow := flags.String("allow", "", "the client SPIFFE ID to accept")
	if err := flags.Parse(args); err != nil {
		return err
	}
	allowed, err := spiffeid.FromString(*allow)
	if err != nil {
		return err
	}
	ctx := context.Background()
	src, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		return fmt.Errorf("NewX509Source: %w", err)
	}
	defer src.Close()
	listener, err := spiffetls.ListenWithMode(ctx, "tcp", *listen,
		spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeID(allowed), src))
	if err != nil {
		return err
	}
	fmt.Printf("listening on %s\n", listener.Addr())
	for {
		conn, err := listener.Accept()
		if err != nil {
			return err
		}
		go answer(conn, src)
	}
}

type tlsState interface {
	ConnectionState() tls.ConnectionState
	Handshake() error
}

func answer(conn net.Conn, src *workloadapi.X509Source) {
	defer conn.Close()
	peer, err := peerOf(conn)
	if err != nil {
		fmt.Printf("handshake failed: %v\n", err)
		return
	}
	fmt.Printf("accepted %s\n", peer)
	lines := bufio.NewScanner(conn)
	for lines.Scan() {
		own, err := src.GetX509SVID()
		if err != nil {
			return
		}
		fmt.Fprintf(conn, "server-serial=%s peer=%s\n", serial(own.Certificates[0]), peer)
	}
}

// peerOf completes the handshake and names the peer's leaf (ID and serial).
func peerOf(conn net.Conn) (string, error) {
	state, ok := conn.(tlsState)
	if !ok {
		return "", errors.New("not a TLS connection")
	}
	if err := state.Handshake(); err != nil {
		return "", err
	}
	certs := state.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return "", errors.New("no peer certificate")
	}
	id, err := x509svid.IDFromCert(certs[0])
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s/%s", id, serial(certs[0])), nil
}

// dial holds one mTLS connection open for --seconds while opening a new one
// every --interval, each authorising the server as --server-id; it reports
// the serials the server presented on new connections, its own serials, and
// whether the first connection still carried a request at the end.
func dial(args []string) error {
	flags := flag.NewFlagSet("dial", flag.ContinueOnError)
	addr := flags.String("addr", "", "server address")
	serverID := flags.String("server-id", "", "the server SPIFFE ID to accept")
	seconds := flags.Int("seconds", 10, "how long to keep dialling")
	interval := flags.Duration("interval", 500*time.Millisecond, "between new connections")
	if err := flags.Parse(args); err != nil {
		return err
	}
	want, err := spiffeid.FromString(*serverID)
	if err != nil {
		return err
	}
	ctx := context.Background()
	src, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		return fmt.Errorf("NewX509Source: %w", err)
	}
	defer src.Close()
	mode := spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(want), src)
	long, err := spiffetls.DialWithMode(ctx, "tcp", *addr, mode)
	if err != nil {
		return fmt.Errorf("first connection: %w", err)
	}
	defer long.Close()
	longReader := bufio.NewReader(long)
	if _, err := roundTrip(long, longReader); err != nil {
		return fmt.Errorf("first request: %w", err)
	}
	serverSerials := map[string]bool{}
	clientSerials := map[string]bool{}
	connections, failures := 0, []string{}
	deadline := time.Now().Add(time.Duration(*seconds) * time.Second)
	for time.Now().Before(deadline) {
		if own, err := src.GetX509SVID(); err == nil {
			clientSerials[serial(own.Certificates[0])] = true
		}
		conn, err := spiffetls.DialWithMode(ctx, "tcp", *addr, mode)
		if err == nil {
			var peer string
			peer, err = peerOf(conn)
			if err == nil {
				_, err = roundTrip(conn, bufio.NewReader(conn))
				serverSerials[peer[strings.LastIndex(peer, "/")+1:]] = true
			}
			conn.Close()
		}
		connections++
		if err != nil {
			failures = append(failures, err.Error())
		}
		time.Sleep(*interval)
	}
	reply, err := roundTrip(long, longReader)
	printJSON(map[string]any{
		"connections":           connections,
		"failures":              failures,
		"server_serials":        keys(serverSerials),
		"client_serials":        keys(clientSerials),
		"long_connection_reply": reply,
		"long_connection_error": errString(err),
	})
	return nil
}

func roundTrip(conn net.Conn, reader *bufio.Reader) (string, error) {
	if err := conn.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return "", err
	}
	if _, err := fmt.Fprintln(conn, "hello"); err != nil {
		return "", err
	}
	line, err := reader.ReadString('\n')
	return strings.TrimSpace(line), err
}

func keys(set map[string]bool) []string {
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// watch runs an X509Source beside a raw FetchX509SVID stream and prints
// what each sees, so the test can change entries and restart the agent
// under one Go process:
//
//	ready serial=S               both have their first SVID
//	raw update serial=S          the raw stream got a message
//	raw ended code=C             the raw stream ended with status C
//	source kept serial=S         what the source holds once the raw stream ended
//	source update #N serial=S    the source's Nth update after ready
func watch() error {
	ctx := context.Background()
	src, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		return fmt.Errorf("NewX509Source: %w", err)
	}
	defer src.Close()
	first, err := src.GetX509SVID()
	if err != nil {
		return err
	}
	stream, err := rawStream(ctx)
	if err != nil {
		return err
	}
	if _, err := stream.Recv(); err != nil {
		return fmt.Errorf("raw stream: %w", err)
	}
	fmt.Printf("ready serial=%s\n", serial(first.Certificates[0]))
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				fmt.Printf("raw ended code=%s\n", status.Code(err))
				if svid, err := src.GetX509SVID(); err == nil {
					fmt.Printf("source kept serial=%s\n", serial(svid.Certificates[0]))
				}
				return
			}
			if len(resp.Svids) > 0 {
				if cert, err := x509.ParseCertificate(resp.Svids[0].X509Svid); err == nil {
					fmt.Printf("raw update serial=%s\n", serial(cert))
				}
			}
		}
	}()
	for n := 1; ; n++ {
		<-src.Updated()
		svid, err := src.GetX509SVID()
		if err != nil {
			return err
		}
		fmt.Printf("source update #%d serial=%s\n", n, serial(svid.Certificates[0]))
	}
}

// rawStream opens FetchX509SVID with go-spiffe's generated client, as a
// program that does not use the sources would.
func rawStream(ctx context.Context) (workload.SpiffeWorkloadAPI_FetchX509SVIDClient, error) {
	addr, ok := workloadapi.GetDefaultAddress()
	if !ok {
		return nil, errors.New("SPIFFE_ENDPOINT_SOCKET is not set")
	}
	target, err := workloadapi.TargetFromAddress(addr)
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	ctx = metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
	return workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
}

// noEntry is a caller with no entry: NewX509Source must give up when its
// 3 s context ends, with the agent's refusal as the reason.
func noEntry() error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	src, err := workloadapi.NewX509Source(ctx)
	if err == nil {
		src.Close()
	}
	printJSON(map[string]any{
		"error":        errString(err),
		"elapsed_secs": time.Since(start).Seconds(),
	})
	return nil
}
