package meshpilot.interop;

import io.micrometer.tracing.Span;
import io.micrometer.tracing.Tracer;
import java.util.LinkedHashMap;
import java.util.Map;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.RequestHeader;
import org.springframework.web.bind.annotation.RestController;
import org.springframework.web.client.RestClient;

/**
 * One Spring Boot app in two roles. GET /chain answers with the current trace id (Micrometer
 * Tracing) and the headers it got; with next.url set it first calls that URL (through its
 * sidecar's outbound listener, with Host next.host) with the auto-configured, instrumented
 * RestClient and includes the answer.
 */
@SpringBootApplication
@RestController
public class TraceApp {
    private final RestClient client;
    private final Tracer tracer;

    @Value("${spring.application.name}")
    private String name;

    @Value("${next.url:}")
    private String next;

    @Value("${next.host:}")
    private String nextHost;

    TraceApp(RestClient.Builder builder, Tracer tracer) {
        this.client = builder.build();
        this.tracer = tracer;
    }

    @GetMapping("/chain")
    Map<String, Object> chain(@RequestHeader Map<String, String> headers) {
        Map<String, Object> out = new LinkedHashMap<>();
        Span span = tracer.currentSpan();
        out.put("app", name);
        out.put("traceId", span != null ? span.context().traceId() : "");
        out.put("spanId", span != null ? span.context().spanId() : "");
        out.put("headers", headers);
        if (!next.isEmpty()) {
            out.put("next", client.get().uri(next).header("Host", nextHost).retrieve().body(String.class));
        }
        return out;
    }

    @GetMapping("/healthz")
    String healthz() {
        return "ok";
    }

    public static void main(String[] args) {
        SpringApplication.run(TraceApp.class, args);
    }
}
