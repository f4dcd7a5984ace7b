package meshpilot.interop;

import java.time.Duration;
import java.util.Map;

import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.web.client.RestTemplateBuilder;
import org.springframework.cloud.client.loadbalancer.LoadBalanced;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.PathVariable;
import org.springframework.web.bind.annotation.RequestHeader;
import org.springframework.web.bind.annotation.RestController;
import org.springframework.web.client.RestTemplate;

/** A plain Spring Cloud app: answers /hello and calls other services by name through its load-balanced client. */
@SpringBootApplication
public class App {
    public static void main(String[] args) {
        SpringApplication.run(App.class, args);
    }

    @Configuration
    static class Clients {
        @Bean
        @LoadBalanced
        RestTemplate loadBalanced(RestTemplateBuilder builder) {
            return builder.setConnectTimeout(Duration.ofSeconds(1)).setReadTimeout(Duration.ofSeconds(3)).build();
        }
    }

    @RestController
    static class Endpoints {
        private final RestTemplate rest;
        private final String name;

        Endpoints(RestTemplate rest, @Value("${spring.application.name}") String name) {
            this.rest = rest;
            this.name = name;
        }

        @GetMapping("/hello")
        Map<String, String> hello(@RequestHeader(value = "x-mesh-caller", required = false) String caller) {
            return Map.of("app", name, "caller", caller == null ? "" : caller);
        }

        @GetMapping("/call/{service}")
        String call(@PathVariable String service) {
            return rest.getForObject("http://" + service + "/from-" + name, String.class);
        }
    }
}
