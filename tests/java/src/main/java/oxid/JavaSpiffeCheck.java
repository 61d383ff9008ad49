package oxid;

import java.security.PublicKey;
import java.security.interfaces.ECPrivateKey;
import java.security.interfaces.ECPublicKey;
import java.util.List;
import java.util.Set;

import io.spiffe.bundle.jwtbundle.JwtBundle;
import io.spiffe.bundle.x509bundle.X509Bundle;
import io.spiffe.svid.jwtsvid.JwtSvid;
import io.spiffe.svid.x509svid.X509Svid;
import io.spiffe.workloadapi.DefaultJwtSource;
import io.spiffe.workloadapi.DefaultWorkloadApiClient;
import io.spiffe.workloadapi.DefaultX509Source;
import io.spiffe.workloadapi.JwtSource;
import io.spiffe.workloadapi.WorkloadApiClient;

/**
 * java-spiffe (grpc-java over Netty epoll) against an oxid agent, found
 * through SPIFFE_ENDPOINT_SOCKET. Prints one line of JSON per check for
 * tests/java_spiffe.rs; exits non-zero with the exception on failure.
 */
public final class JavaSpiffeCheck {
    public static void main(String[] args) throws Exception {
        String check = args.length > 0 ? args[0] : "";
        switch (check) {
            case "x509" -> x509();
            case "jwt" -> jwt(args.length > 1 ? args[1].split(",") : new String[] {"spiffe://example.org/api"});
            default -> {
                System.err.println("usage: JavaSpiffeCheck x509 | jwt AUD[,AUD...]");
                System.exit(2);
            }
        }
        // grpc-java's non-daemon threads would keep the JVM up.
        System.exit(0);
    }

    private static void x509() throws Exception {
        try (DefaultX509Source source = DefaultX509Source.newSource()) {
            X509Svid svid = source.getX509Svid();
            X509Bundle bundle = source.getBundleForTrustDomain(svid.getSpiffeId().getTrustDomain());
            boolean signedByBundle = false;
            for (var authority : bundle.getX509Authorities()) {
                List<java.security.cert.X509Certificate> chain = svid.getChain();
                try {
                    chain.get(chain.size() - 1).verify(authority.getPublicKey());
                    signedByBundle = true;
                } catch (Exception notThisOne) {
                    // Another authority of the bundle may have signed it.
                }
            }
            System.out.println("{\"spiffe_id\":\"" + svid.getSpiffeId()
                    + "\",\"serial\":\"" + svid.getLeaf().getSerialNumber().toString(16)
                    + "\",\"key_matches_leaf\":" + keyMatches(svid)
                    + ",\"chain_signed_by_bundle\":" + signedByBundle
                    + ",\"bundle_trust_domain\":\"" + bundle.getTrustDomain()
                    + "\",\"bundle_authorities\":" + bundle.getX509Authorities().size() + "}");
        }
    }

    /** Whether the private key is the leaf's: what it signs, the leaf's key verifies. */
    private static boolean keyMatches(X509Svid svid) throws Exception {
        PublicKey leafKey = svid.getLeaf().getPublicKey();
        if (!(svid.getPrivateKey() instanceof ECPrivateKey priv) || !(leafKey instanceof ECPublicKey pub)) {
            return false;
        }
        var signer = java.security.Signature.getInstance("SHA256withECDSA");
        signer.initSign(priv);
        byte[] message = "oxid".getBytes(java.nio.charset.StandardCharsets.UTF_8);
        signer.update(message);
        byte[] signature = signer.sign();
        var verifier = java.security.Signature.getInstance("SHA256withECDSA");
        verifier.initVerify(pub);
        verifier.update(message);
        return verifier.verify(signature);
    }

    private static void jwt(String[] audiences) throws Exception {
        String first = audiences[0];
        String[] extra = java.util.Arrays.copyOfRange(audiences, 1, audiences.length);
        try (JwtSource source = DefaultJwtSource.newSource();
                WorkloadApiClient client = DefaultWorkloadApiClient.newClient()) {
            JwtSvid svid = source.fetchJwtSvid(first, extra);
            JwtSvid parsed = JwtSvid.parseAndValidate(svid.getToken(), source, Set.of(first));
            JwtBundle bundle = source.getBundleForTrustDomain(svid.getSpiffeId().getTrustDomain());
            JwtSvid validated = client.validateJwtSvid(svid.getToken(), first);
            String otherAudience;
            try {
                JwtSvid.parseAndValidate(svid.getToken(), source, Set.of("spiffe://example.org/someone-else"));
                otherAudience = "";
            } catch (Exception expected) {
                otherAudience = expected.getClass().getSimpleName();
            }
            System.out.println("{\"spiffe_id\":\"" + svid.getSpiffeId()
                    + "\",\"audiences\":" + svid.getAudience().size()
                    + ",\"parsed_id\":\"" + parsed.getSpiffeId()
                    + "\",\"api_validated_id\":\"" + validated.getSpiffeId()
                    + "\",\"jwt_authorities\":" + bundle.getJwtAuthorities().size()
                    + ",\"other_audience_error\":\"" + otherAudience + "\"}");
        }
    }
}
