// Command probe drives cloud.google.com/go/compute/metadata and
// golang.org/x/oauth2/google against the metadata server named by
// GCE_METADATA_HOST, the way an unmodified Go app would, and prints one JSON
// object on stdout.
//
// usage: probe AUDIENCE [STORAGE_LIST_URL]
//
// Built offline from Debian's packaged sources (GOPATH=/usr/share/gocode,
// GO111MODULE=off); see scripts/install-clients and tests/clients/test_go.py.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"os"

	"cloud.google.com/go/compute/metadata"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/google"
)

const cloudPlatform = "https://www.googleapis.com/auth/cloud-platform"

type storageResult struct {
	Status int      `json:"status"`
	Names  []string `json:"names"`
}

type result struct {
	OnGCE          bool           `json:"onGCE"`
	ProjectID      string         `json:"projectId"`
	Zone           string         `json:"zone"`
	Email          string         `json:"email"`
	DefaultProject string         `json:"defaultCredentialsProject"`
	DefaultToken   string         `json:"defaultCredentialsToken"`
	TokenType      string         `json:"tokenType"`
	ComputeToken   string         `json:"computeToken"`
	IDToken        string         `json:"idToken"`
	Storage        *storageResult `json:"storage,omitempty"`
}

func fail(step string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", step, err)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage", fmt.Errorf("probe AUDIENCE [STORAGE_LIST_URL]"))
	}
	audience := os.Args[1]
	ctx := context.Background()
	var out result
	var err error

	out.OnGCE = metadata.OnGCE()
	if out.ProjectID, err = metadata.ProjectID(); err != nil {
		fail("metadata.ProjectID", err)
	}
	if out.Zone, err = metadata.Zone(); err != nil {
		fail("metadata.Zone", err)
	}
	if out.Email, err = metadata.Email("default"); err != nil {
		fail("metadata.Email", err)
	}

	creds, err := google.FindDefaultCredentials(ctx, cloudPlatform)
	if err != nil {
		fail("google.FindDefaultCredentials", err)
	}
	out.DefaultProject = creds.ProjectID
	tok, err := creds.TokenSource.Token()
	if err != nil {
		fail("FindDefaultCredentials token", err)
	}
	out.DefaultToken, out.TokenType = tok.AccessToken, tok.Type()

	computeTok, err := google.ComputeTokenSource("").Token()
	if err != nil {
		fail("google.ComputeTokenSource", err)
	}
	out.ComputeToken = computeTok.AccessToken

	// What google.golang.org/api/idtoken does on GCE.
	out.IDToken, err = metadata.Get("instance/service-accounts/default/identity?audience=" +
		url.QueryEscape(audience) + "&format=full")
	if err != nil {
		fail("metadata identity", err)
	}

	if len(os.Args) > 2 {
		// An authorised API call through oauth2.NewClient: Authorization comes from the token source.
		res, err := oauth2.NewClient(ctx, creds.TokenSource).Get(os.Args[2])
		if err != nil {
			fail("storage list", err)
		}
		defer res.Body.Close()
		body, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
		if err != nil {
			fail("storage list body", err)
		}
		var listing struct {
			Items []struct {
				Name string `json:"name"`
			} `json:"items"`
		}
		out.Storage = &storageResult{Status: res.StatusCode, Names: []string{}}
		if res.StatusCode == 200 {
			if err := json.Unmarshal(body, &listing); err != nil {
				fail("storage list JSON", err)
			}
			for _, item := range listing.Items {
				out.Storage.Names = append(out.Storage.Names, item.Name)
			}
		}
	}

	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("encode", err)
	}
}
